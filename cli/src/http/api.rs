//! The resources under `/api/v1` (docs/api.md has each with its body and answers).
//!
//! Each handler turns the HTTP request into the control socket's [`Request`], hands it to
//! [`dispatch`], and answers with the CLI's `--json` view of the result. Ids in paths and
//! tokens in bodies take either form the CLI prints (`run-7` or `7`, `token-3` or `3`).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keel_core::{
    limits, AuditQuery, AuditRecord, FencingToken, Incident, Job, JobId, Outcome, Run, RunId,
    RunQuery, StateName, WorkerId,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{Caller, Need};
use super::{
    forbidden, status_of, Api, ApiError, Body, Forbidden, Operator, Params, Reader, Worker,
};
use crate::daemon::dispatch;
use crate::error::Failure;
use crate::jobdef::{JobDef, Prior, Resolve};
use crate::protocol::{
    from_value, jobs_from, Added, CheckpointAnswer, ClaimedAttempt, ContextView, LeaseOp, Request,
    Response, RunsPage,
};
use crate::views;

type Answer = Result<HttpResponse, ApiError>;

/// Every resource. Each handler names the role it needs by an extractor ([`Reader`],
/// [`Worker`], [`Operator`]), so the table of who may do what is the handlers' signatures.
/// `POST /rpc` is the control socket's protocol over HTTP, for `keel --server`: each request
/// in it is checked as its REST route would be.
pub(crate) fn routes() -> Router<Api> {
    Router::new()
        .route("/status", get(status))
        .route("/jobs", get(list_jobs).post(create_job))
        .route(
            "/jobs/{name}",
            get(show_job).put(replace_job).delete(delete_job),
        )
        .route("/jobs/{name}/pause", post(pause_job))
        .route("/jobs/{name}/resume", post(resume_job))
        .route("/jobs/{name}/trigger", post(trigger_job))
        .route("/runs", get(list_runs))
        .route("/runs/{run}", get(show_run))
        .route("/runs/{run}/cancel", post(cancel_run))
        .route("/runs/{run}/logs", get(super::logs::logs))
        .route("/queue", get(super::queue::queue))
        .route("/incidents", get(list_incidents).post(super::watch::open))
        .route(
            "/incidents/{id}/acknowledge",
            post(super::watch::acknowledge),
        )
        .route("/incidents/{id}/resolve", post(super::watch::resolve))
        .route("/rules", get(super::watch::rules))
        .route("/workers", get(super::watch::workers))
        .route("/events", get(super::events::events))
        .route("/claims", post(claim))
        .route("/runs/{run}/heartbeat", post(heartbeat))
        .route("/runs/{run}/progress", post(progress))
        .route("/runs/{run}/context", post(context))
        .route("/runs/{run}/checkpoint", post(checkpoint))
        .route("/runs/{run}/complete", post(complete))
        .route("/runs/{run}/fail", post(fail))
        .route("/runs/{run}/verifications", post(verify))
        .route("/runs/{run}/lease", axum::routing::patch(lease))
        .route("/rpc", post(rpc))
}

/// The OpenAPI document, built into the binary.
pub(crate) async fn openapi() -> HttpResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// docs/api.md describes the same resources in prose.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

async fn call(api: &Api, request: Request) -> Result<Value, ApiError> {
    dispatch(&api.server, request, "an HTTP client")
        .await
        .map_err(ApiError)
}

/// A change an operator asked for, logged with who asked.
async fn change(api: &Api, caller: &Caller, request: Request) -> Result<Value, ApiError> {
    dispatch(&api.server, request, &caller.actor())
        .await
        .map_err(ApiError)
}

fn ok(value: Value) -> Answer {
    Ok(Json(value).into_response())
}

// ----- ids ---------------------------------------------------------------------------------

fn run_id(text: &str) -> Result<RunId, ApiError> {
    crate::commands::parse_run(text).map_err(ApiError)
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    JobId::new(text)
        .map_err(|e| ApiError(Failure::input(format!("invalid job name {text:?}: {e}"))))
}

/// A fencing token as a body carries it: `3` or `"token-3"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenArg {
    Number(u64),
    Text(String),
}

impl TokenArg {
    fn token(&self) -> Result<FencingToken, ApiError> {
        match self {
            TokenArg::Number(n) => Ok(FencingToken(*n)),
            TokenArg::Text(text) => crate::commands::parse_token(text).map_err(ApiError),
        }
    }
}

// ----- status and jobs ---------------------------------------------------------------------

async fn status(_: Reader, State(api): State<Api>) -> Answer {
    ok(call(&api, Request::Status).await?)
}

async fn jobs(api: &Api) -> Result<Vec<Job>, ApiError> {
    jobs_from(call(api, Request::Jobs).await?).map_err(ApiError)
}

async fn list_jobs(_: Reader, State(api): State<Api>) -> Answer {
    let jobs = jobs(&api).await?;
    ok(views::all(&jobs, views::job))
}

async fn show_job(_: Reader, State(api): State<Api>, Path(name): Path<String>) -> Answer {
    let id = job_id(&name)?;
    let job = jobs(&api)
        .await?
        .into_iter()
        .find(|j| j.spec.id == id)
        .ok_or_else(|| ApiError(Failure::NotFound(format!("no job named {name}"))))?;
    let query = RunQuery {
        job: Some(id),
        limit: 5,
        ..RunQuery::default()
    };
    let page: RunsPage = from_value(call(&api, Request::Runs { query }).await?)?;
    ok(json!({
        "job": views::job(&job),
        "recent_runs": views::all(&page.runs, views::run),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateQuery {
    #[serde(default)]
    replace: bool,
}

/// `POST /jobs`: a keel.toml `[[job]]` table as JSON.
async fn create_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Params(query): Params<CreateQuery>,
    Body(def): Body<JobDef>,
) -> Answer {
    add_job(&api, &caller, def, query.replace, StatusCode::CREATED).await
}

/// `PUT /jobs/{name}`: the same table; the name is the path's.
async fn replace_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(name): Path<String>,
    Body(mut def): Body<Value>,
) -> Answer {
    let object = def
        .as_object_mut()
        .ok_or_else(|| ApiError(Failure::input("malformed body: expected a JSON object")))?;
    match object.get("name") {
        Some(Value::String(given)) if *given != name => {
            return Err(ApiError(Failure::input(format!(
                "name: the body names job {given:?} but the path names {name:?}"
            ))))
        }
        _ => {
            object.insert("name".into(), Value::String(name));
        }
    }
    let def: JobDef = serde_path_to_error::deserialize(def)
        .map_err(|e| ApiError(Failure::input(format!("malformed body: {e}"))))?;
    // Creates or replaces: 201 if it was new, 200 if it replaced one.
    add_job(&api, &caller, def, true, StatusCode::CREATED).await
}

async fn add_job(
    api: &Api,
    caller: &Caller,
    def: JobDef,
    replace: bool,
    status: StatusCode,
) -> Answer {
    // A relative `cwd` is the daemon's working directory's, as for keel.toml.
    let base_dir = std::env::current_dir()
        .map_err(|e| ApiError(Failure::runtime(format!("cannot read the directory: {e}"))))?;
    let spec = def
        .to_spec(Resolve {
            now: crate::direct::wall_clock(),
            base_dir: &base_dir,
            prior: Prior::None,
        })
        .map_err(|e| ApiError(Failure::input(format!("job {}: {e}", def.name))))?;
    let name = spec.id.clone();
    let added: Added = match change(api, caller, Request::AddJob { spec, replace }).await {
        Ok(value) => from_value(value)?,
        // The core's refusal names the CLI's flag; over HTTP the way is another.
        Err(ApiError(Failure::BadInput(m))) if m.contains("already exists") => {
            return Err(ApiError(Failure::input(format!(
                "a job named {name} already exists: PUT /api/v1/jobs/{name} replaces its \
                 definition (or POST with ?replace=true)"
            ))))
        }
        Err(e) => return Err(e),
    };
    let status = if added.replaced {
        StatusCode::OK
    } else {
        status
    };
    Ok((
        status,
        Json(json!({
            "job": added.job.as_ref().map(views::job),
            "action": if added.replaced { "replaced" } else { "added" },
            "changed": true,
        })),
    )
        .into_response())
}

async fn delete_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Answer {
    let job = job_id(&name)?;
    change(&api, &caller, Request::RemoveJob { job }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn pause_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Answer {
    let job = job_id(&name)?;
    let changed: bool =
        from_value(change(&api, &caller, Request::PauseJob { job: job.clone() }).await?)?;
    acted_on_job(&api, &job, "paused", changed).await
}

async fn resume_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Answer {
    let job = job_id(&name)?;
    let changed: bool =
        from_value(change(&api, &caller, Request::ResumeJob { job: job.clone() }).await?)?;
    acted_on_job(&api, &job, "resumed", changed).await
}

async fn acted_on_job(api: &Api, id: &JobId, action: &str, changed: bool) -> Answer {
    let job = jobs(api).await?.into_iter().find(|j| &j.spec.id == id);
    let view = job.as_ref().map_or(Value::Null, views::job);
    ok(views::acted("job", view, action, changed))
}

async fn trigger_job(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Answer {
    let job = job_id(&name)?;
    let run: RunId = from_value(change(&api, &caller, Request::TriggerJob { job }).await?)?;
    let stored: Option<Run> = from_value(call(&api, Request::Run { run }).await?)?;
    let view = stored
        .as_ref()
        .map_or_else(|| json!({ "run": run.to_string() }), views::run);
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

// ----- runs --------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsFilter {
    job: Option<String>,
    state: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(
    _: Reader,
    State(api): State<Api>,
    Params(filter): Params<RunsFilter>,
) -> Answer {
    let state = filter
        .state
        .as_deref()
        .map(|text| {
            serde_json::from_value::<StateName>(Value::String(text.replace('-', "_"))).map_err(
                |_| {
                    ApiError(Failure::input(format!(
                        "state: {text:?} is not a run state (queued, backing_off, starting, \
                         running, succeeded, failed, failed_dropped, cancelled, interrupted)"
                    )))
                },
            )
        })
        .transpose()?;
    let limit = filter.limit.unwrap_or(50);
    if limit == 0 || limit > limits::HISTORY_PAGE_MAX {
        return Err(ApiError(Failure::input(format!(
            "limit: {limit} is not between 1 and {}",
            limits::HISTORY_PAGE_MAX
        ))));
    }
    let query = RunQuery {
        job: filter.job.as_deref().map(job_id).transpose()?,
        state,
        before: filter.before.as_deref().map(run_id).transpose()?,
        limit,
        ..RunQuery::default()
    };
    let page: RunsPage = from_value(call(&api, Request::Runs { query }).await?)?;
    ok(json!({
        "runs": views::all(&page.runs, views::run),
        "next": page.next.map(|r| r.to_string()),
    }))
}

/// A run with its audit trail, oldest first.
async fn show_run(_: Reader, State(api): State<Api>, Path(run): Path<String>) -> Answer {
    let id = run_id(&run)?;
    let stored: Option<Run> = from_value(call(&api, Request::Run { run: id }).await?)?;
    let Some(stored) = stored else {
        return Err(ApiError(Failure::NotFound(format!(
            "no run {id} (it never existed, or the history policy pruned it)"
        ))));
    };
    let mut audit: Vec<AuditRecord> = Vec::new();
    loop {
        let query = AuditQuery {
            run: Some(id),
            after: audit.last().map(|r| r.seq),
            limit: limits::HISTORY_PAGE_MAX,
            ..AuditQuery::default()
        };
        let page: Vec<AuditRecord> = from_value(call(&api, Request::Audit { query }).await?)?;
        let full = page.len() == limits::HISTORY_PAGE_MAX;
        audit.extend(page);
        if !full {
            break;
        }
    }
    ok(json!({
        "run": views::run(&stored),
        "audit": views::all(&audit, views::audit),
    }))
}

async fn cancel_run(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(run): Path<String>,
) -> Answer {
    let run = run_id(&run)?;
    change(&api, &caller, Request::CancelRun { run }).await?;
    ok(json!({ "run": run.to_string(), "cancel_requested": true }))
}

// ----- incidents ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncidentsFilter {
    #[serde(default)]
    open: bool,
}

async fn list_incidents(
    _: Reader,
    State(api): State<Api>,
    Params(filter): Params<IncidentsFilter>,
) -> Answer {
    let mut incidents: Vec<Incident> = from_value(call(&api, Request::Incidents).await?)?;
    if filter.open {
        incidents.retain(|i| i.resolved_at.is_none());
    }
    incidents.sort_by_key(|i| (i.resolved_at.is_some(), std::cmp::Reverse(i.id)));
    ok(views::all(&incidents, views::incident))
}

// ----- the worker contract -----------------------------------------------------------------

/// The run and token of a worker's call, once the caller may work on the run's kind.
async fn held(
    api: &Api,
    caller: &Caller,
    run: &str,
    token: &TokenArg,
) -> Result<(RunId, FencingToken), ApiError> {
    let run = run_id(run)?;
    may_work_on_run(api, caller, run).await?;
    Ok((run, token.token()?))
}

/// A worker token limited to some kinds may act only on runs of those kinds.
async fn may_work_on_run(api: &Api, caller: &Caller, run: RunId) -> Result<(), Forbidden> {
    if matches!(caller, Caller::Open) {
        return Ok(());
    }
    let kind = api
        .server
        .handle
        .peek(move |s, _| s.run(run).map(|r| r.kind().to_string()))
        .await
        .ok()
        .flatten();
    match kind {
        // An unknown run: the call itself answers 404.
        None => Ok(()),
        Some(kind) => caller.may_work_on(&kind).map_err(Forbidden),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    worker: String,
    kinds: Vec<String>,
}

/// `POST /claims`: 200 with the attempt, or 204 when nothing is due.
async fn claim(
    State(api): State<Api>,
    Worker(caller): Worker,
    Body(body): Body<ClaimBody>,
) -> Answer {
    if body.kinds.is_empty() {
        return Err(ApiError(Failure::input("kinds: name at least one kind")));
    }
    for kind in &body.kinds {
        if let Err(why) = caller.may_work_on(kind) {
            return Ok(forbidden(why));
        }
    }
    let worker = WorkerId::new(&body.worker).map_err(|e| {
        ApiError(Failure::input(format!(
            "worker: invalid worker id {:?}: {e}",
            body.worker
        )))
    })?;
    let claimed: Option<ClaimedAttempt> = from_value(
        call(
            &api,
            Request::Claim {
                worker,
                kinds: body.kinds,
            },
        )
        .await?,
    )?;
    match claimed {
        // As `keel worker claim --json` prints it.
        Some(attempt) => ok(serde_json::to_value(attempt).unwrap_or(Value::Null)),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: TokenArg,
}

async fn heartbeat(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<TokenBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let lease: keel_core::Lease = from_value(call(&api, Request::Touch { run, token }).await?)?;
    ok(json!({
        "run": run.to_string(),
        "token": lease.token.to_string(),
        "lease_expires_at": lease.expires_at.to_string(),
        "lease_expires_at_ms": lease.expires_at,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    token: TokenArg,
    phase: String,
    #[serde(default)]
    message: String,
}

async fn progress(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<ProgressBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    call(
        &api,
        Request::Progress {
            run,
            token,
            phase: body.phase.clone(),
            message: body.message,
        },
    )
    .await?;
    ok(json!({ "run": run.to_string(), "phase": body.phase }))
}

async fn context(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<TokenBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let context: ContextView = from_value(call(&api, Request::Context { run, token }).await?)?;
    let mut value = serde_json::to_value(&context).unwrap_or(Value::Null);
    value["run"] = json!(run.to_string());
    ok(value)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    token: TokenArg,
    data: String,
}

async fn checkpoint(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<CheckpointBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let answer: CheckpointAnswer = from_value(
        call(
            &api,
            Request::Checkpoint {
                run,
                token,
                data: body.data,
            },
        )
        .await?,
    )?;
    ok(serde_json::to_value(answer).unwrap_or(Value::Null))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    token: TokenArg,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    artifacts: BTreeMap<String, String>,
}

async fn complete(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<CompleteBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let outcome = Outcome::Success {
        summary: body.summary,
        artifacts: body.artifacts,
    };
    end_attempt(&api, run, token, outcome).await?;
    ok(json!({ "run": run.to_string(), "completed": true }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    token: TokenArg,
    message: String,
    #[serde(default)]
    permanent: bool,
}

async fn fail(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<FailBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let outcome = if body.permanent {
        Outcome::Permanent {
            message: body.message,
        }
    } else {
        Outcome::Retryable {
            message: body.message,
        }
    };
    end_attempt(&api, run, token, outcome).await?;
    ok(json!({ "run": run.to_string(), "failed": true, "permanent": body.permanent }))
}

async fn end_attempt(
    api: &Api,
    run: RunId,
    token: FencingToken,
    outcome: Outcome,
) -> Result<(), ApiError> {
    call(
        api,
        Request::Complete {
            run,
            token,
            outcome,
        },
    )
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    token: TokenArg,
    target: String,
}

/// `POST /runs/{run}/verifications`: keel checks an artifact for its holder and stores the
/// evidence (201); a failed check is an answer too, with `"ok": false`.
async fn verify(
    State(api): State<Api>,
    Worker(caller): Worker,
    Path(run): Path<String>,
    Body(body): Body<VerifyBody>,
) -> Answer {
    let (run, token) = held(&api, &caller, &run, &body.token).await?;
    let request = Request::Verify {
        run,
        token,
        target: body.target,
    };
    let evidence: keel_core::artifact::Verification = from_value(call(&api, request).await?)?;
    Ok((StatusCode::CREATED, Json(views::verification(&evidence))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    action: LeaseOp,
    reason: String,
}

/// `PATCH /runs/{run}/lease`: an operator releases, reclaims or restores the run's lease.
async fn lease(
    Operator(caller): Operator,
    State(api): State<Api>,
    Path(run): Path<String>,
    Body(body): Body<LeaseBody>,
) -> Answer {
    let run = run_id(&run)?;
    if body.reason.trim().is_empty() {
        return Err(ApiError(Failure::input(
            "reason: say why, for the audit trail",
        )));
    }
    let request = Request::Lease {
        run,
        action: body.action,
        by: caller.name(),
        reason: body.reason,
    };
    ok(change(&api, &caller, request).await?)
}

// ----- rpc ---------------------------------------------------------------------------------

/// What a socket request needs of its caller, as its REST route would.
fn need_of(request: &Request) -> Need {
    match request {
        r if r.is_read() => Need::Read,
        Request::OpenIncident { .. }
        | Request::AcknowledgeIncident { .. }
        | Request::ResolveIncident { .. } => Need::Operate,
        Request::Claim { .. }
        | Request::Touch { .. }
        | Request::Progress { .. }
        | Request::Context { .. }
        | Request::Checkpoint { .. }
        | Request::Complete { .. }
        | Request::Verify { .. } => Need::Work,
        _ => Need::Operate,
    }
}

async fn rpc(
    State(api): State<Api>,
    Extension(caller): Extension<Caller>,
    Body(request): Body<Request>,
) -> HttpResponse {
    if let Err(why) = caller.may(need_of(&request)) {
        return forbidden(why);
    }
    let run = match &request {
        Request::Claim { kinds, .. } => {
            if let Some(why) = kinds.iter().find_map(|k| caller.may_work_on(k).err()) {
                return forbidden(why);
            }
            None
        }
        Request::Touch { run, .. }
        | Request::Progress { run, .. }
        | Request::Context { run, .. }
        | Request::Checkpoint { run, .. }
        | Request::Complete { run, .. }
        | Request::Verify { run, .. } => Some(*run),
        _ => None,
    };
    if let Some(run) = run {
        if let Err(refused) = may_work_on_run(&api, &caller, run).await {
            return refused.into_response();
        }
    }
    let response = Response::from_result(dispatch(&api.server, request, &caller.actor()).await);
    let status = match &response {
        Response::Ok(_) => StatusCode::OK,
        Response::Err(failure) => status_of(failure),
    };
    // 204 carries no body; the client reads the body whatever the status.
    let status = if status == StatusCode::NO_CONTENT {
        StatusCode::OK
    } else {
        status
    };
    (status, Json(response)).into_response()
}

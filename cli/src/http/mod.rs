//! The daemon's HTTP server: the API under `/api/v1`, `/metrics`, `/healthz`, `/readyz` and
//! the console at `/` (SPEC A1, A4; docs/api.md).
//!
//! Off unless configured (`[http] listen` in keel.toml, or `keel run --http ADDR`). Every
//! resource answers from the same [`dispatch`](crate::daemon::dispatch) the control socket
//! uses, so a change made over HTTP is durable before it is answered, exactly as one made with
//! the CLI, and its JSON is the CLI's `--json` view of the same object.
//!
//! ```text
//! request ─▶ auth (401: no or unknown token) ─▶ role of the route (403) ─▶ handler
//!        handler ─▶ Request ─▶ dispatch ─▶ RuntimeHandle / store ─▶ view ─▶ JSON
//! ```
//!
//! Errors are `{"error": {"code": …, "message": …}}` with the status the code implies:
//! `bad_input` 400 (a malformed body names the field), `not_found` 404, `stale_token` 409
//! (the message names the current lease), `failure` 500.

pub(crate) mod api;
pub(crate) mod auth;
mod console;
mod events;
mod logs;
pub(crate) mod queue;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request as HttpRequest, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::get;
use axum::{Json, Router};
use keel_runtime::prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::daemon::Server;
use crate::error::Failure;
use auth::{Caller, Need, Tokens};

/// What every handler can reach.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) server: Server,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) metrics: Option<PrometheusHandle>,
}

/// A running HTTP server; dropping it stops it.
#[derive(Debug)]
pub(crate) struct HttpServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Where it listens (the port the system chose, for `:0`).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `app` on it until the server is dropped.
pub(crate) async fn serve(addr: SocketAddr, app: Router) -> Result<HttpServer, Failure> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::runtime(format!("cannot read the listener's address: {e}")))?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            crate::daemon::log(&format!("http server on {addr} stopped: {e}"));
        }
    });
    Ok(HttpServer { addr, task })
}

/// The whole application: API, metrics, probes and console.
pub(crate) fn app(api: Api) -> Router {
    let tokens = Arc::clone(&api.tokens);
    let guarded = Router::new()
        .nest("/api/v1", api::routes())
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_MAX_BYTES))
        .layer(middleware::from_fn_with_state(tokens, authenticate))
        .with_state(api.clone());
    // The probes and the console's page need no token: the page asks for one before it reads
    // anything, and the probes say nothing but "alive" and "ready".
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/v1/openapi.json", get(api::openapi))
        .merge(console::routes())
        .with_state(api)
        .merge(guarded)
        .fallback(|| async {
            ApiError(Failure::NotFound(
                "no such resource (see /api/v1/openapi.json)".into(),
            ))
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"error": {"code": "method_not_allowed", "message":
                    "this resource does not take that method (see /api/v1/openapi.json)"}})),
            )
        })
}

/// A router that serves only `/metrics`, for keel.toml's `metrics = ADDR` (loopback only).
pub(crate) fn metrics_only(metrics: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { prometheus_text(&metrics) }
        }),
    )
}

fn prometheus_text(metrics: &PrometheusHandle) -> HttpResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
        .into_response()
}

async fn metrics(_: Reader, State(api): State<Api>) -> HttpResponse {
    match &api.metrics {
        Some(metrics) => prometheus_text(metrics),
        None => ApiError(Failure::NotFound("metrics are not recorded here".into())).into_response(),
    }
}

/// Ready when the scheduler answers within a second and is not shutting down.
async fn ready(State(api): State<Api>) -> HttpResponse {
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        api.server.handle.peek(|s, _| s.is_shutting_down()),
    )
    .await;
    match answer {
        Ok(Ok(false)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Ok(true)) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the scheduler does not answer\n",
        )
            .into_response(),
    }
}

/// Finds who calls (401 if no token matches) and keeps it for the role checks.
async fn authenticate(
    State(tokens): State<Arc<Tokens>>,
    mut request: HttpRequest,
    next: Next,
) -> HttpResponse {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match tokens.caller(header) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(why) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": {"code": "unauthorized", "message": why}})),
        )
            .into_response(),
    }
}

/// The caller that [`authenticate`] found, if its role may do what `need` names; 403 if not.
fn caller_for(parts: &Parts, need: Need) -> Result<Caller, Forbidden> {
    let caller = parts
        .extensions
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Forbidden("no caller: the route is outside the API".into()))?;
    caller.may(need).map_err(Forbidden)?;
    Ok(caller)
}

/// A handler that reads: viewer or operator.
#[derive(Debug)]
pub(crate) struct Reader;

/// A handler of the worker contract: the caller, whose kinds the handler checks.
#[derive(Debug)]
pub(crate) struct Worker(pub(crate) Caller);

/// A handler that changes something: operator.
#[derive(Debug)]
pub(crate) struct Operator(pub(crate) Caller);

impl<S: Send + Sync> FromRequestParts<S> for Reader {
    type Rejection = Forbidden;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        caller_for(parts, Need::Read).map(|_| Reader)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Worker {
    type Rejection = Forbidden;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        caller_for(parts, Need::Work).map(Worker)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = Forbidden;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        caller_for(parts, Need::Operate).map(Operator)
    }
}

/// 403, and why.
#[derive(Debug)]
pub(crate) struct Forbidden(pub(crate) String);

impl IntoResponse for Forbidden {
    fn into_response(self) -> HttpResponse {
        (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": "forbidden", "message": self.0}})),
        )
            .into_response()
    }
}

pub(crate) fn forbidden(why: String) -> HttpResponse {
    Forbidden(why).into_response()
}

/// The largest request body the API reads: as the control socket's longest line, room for a
/// checkpoint at its limit (1 MiB), JSON-escaped.
pub(crate) const BODY_MAX_BYTES: usize = 4 * 1024 * 1024;

/// A failure as an HTTP answer.
#[derive(Debug)]
pub(crate) struct ApiError(pub(crate) Failure);

impl From<Forbidden> for ApiError {
    fn from(refused: Forbidden) -> ApiError {
        ApiError(Failure::Forbidden(refused.0))
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> ApiError {
        ApiError(failure)
    }
}

/// The status a failure answers with.
pub(crate) fn status_of(failure: &Failure) -> StatusCode {
    match failure {
        Failure::BadInput(_) => StatusCode::BAD_REQUEST,
        Failure::NotFound(_) => StatusCode::NOT_FOUND,
        Failure::StaleToken(_) => StatusCode::CONFLICT,
        Failure::ArtifactGate(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Failure::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Failure::Forbidden(_) => StatusCode::FORBIDDEN,
        Failure::NothingDue(_) => StatusCode::NO_CONTENT,
        Failure::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let status = status_of(&self.0);
        (status, Json(json!({ "error": self.0 }))).into_response()
    }
}

/// Query-string parameters; a bad one answers 400 in the API's error shape, naming it.
#[derive(Debug)]
pub(crate) struct Params<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded_error(query).map(Params)
    }
}

/// Reads `query` as `T`, with serde's message (which names the parameter) on failure.
fn serde_urlencoded_error<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| ApiError(Failure::input("malformed query string")))?,
    )
    .map(|q| q.0)
    .map_err(|e| {
        ApiError(Failure::input(format!(
            "malformed query: {}",
            e.body_text()
                .trim_start_matches("Failed to deserialize query string: ")
        )))
    })
}

/// A JSON body. Unlike axum's `Json`, any content type is read (a `curl -d` works), and a
/// malformed body answers 400 naming the field (`token: invalid type: …`).
#[derive(Debug)]
pub(crate) struct Body<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: HttpRequest, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError(Failure::TooLarge(format!(
                        "the body is larger than the API reads ({BODY_MAX_BYTES} bytes)"
                    )))
                } else {
                    ApiError(Failure::input(format!("cannot read the body: {e}")))
                }
            })?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            axum::body::Bytes::from_static(b"{}")
        } else {
            bytes
        };
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(ApiError(Failure::input(format!(
                "malformed body: {}",
                rejection.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: "
                )
            )))),
        }
    }
}

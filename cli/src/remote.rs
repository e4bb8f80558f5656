//! `--server URL`: commands act on a daemon on another host, over its HTTP API.
//!
//! Each command sends the same [`Request`] it would send on the control socket, as the body of
//! `POST URL/api/v1/rpc`, and reads the same [`Response`]; the daemon checks it against the
//! caller's role as the REST route for it would. The bearer token comes from `KEEL_TOKEN`, or
//! from the file `KEEL_TOKEN_FILE` (or `--token-file`) names, whose first line is the secret.
//! `https://` URLs use rustls with the system's web roots (a reverse proxy terminates TLS in
//! front of the daemon: docs/api.md).

use std::path::Path;

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

use crate::error::Failure;
use crate::protocol::{Request, Response};

/// A daemon reached over HTTP.
#[derive(Debug)]
pub(crate) struct Remote {
    base: String,
    token: Option<String>,
    client: Client,
}

impl Remote {
    /// A client for the daemon at `url` (`http://host:port`, with or without a trailing `/`).
    pub(crate) fn new(url: &str, token_file: Option<&Path>) -> Result<Remote, Failure> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::input(format!(
                "--server {url:?}: expected an http:// or https:// URL, e.g. http://10.0.0.5:8080"
            )));
        }
        let token = match token_file {
            Some(path) => Some(read_token(path)?),
            None => match std::env::var("KEEL_TOKEN") {
                Ok(token) if !token.trim().is_empty() => Some(token.trim().to_string()),
                _ => None,
            },
        };
        let client = Client::builder()
            .timeout(crate::client::answer_timeout()?)
            .build()
            .map_err(|e| Failure::runtime(format!("cannot make an HTTP client: {e}")))?;
        Ok(Remote {
            base,
            token,
            client,
        })
    }

    /// Sends one request and waits for its answer.
    pub(crate) fn call(&self, request: &Request) -> Result<Value, Failure> {
        let url = format!("{}/api/v1/rpc", self.base);
        let mut builder = self.client.post(&url).json(request);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        let answer = builder.send().map_err(|e| self.unreachable(request, e))?;
        let status = answer.status();
        let body = answer
            .text()
            .map_err(|e| Failure::runtime(format!("{url}: cannot read the answer: {e}")))?;
        if let Ok(response) = serde_json::from_str::<Response>(&body) {
            return match response {
                Response::Ok(value) => Ok(value),
                Response::Err(failure) => Err(failure),
            };
        }
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(200).collect());
        match status {
            StatusCode::UNAUTHORIZED => Err(Failure::input(format!(
                "{}: {message} (set KEEL_TOKEN, or --token-file FILE)",
                self.base
            ))),
            StatusCode::FORBIDDEN => Err(Failure::input(format!("{}: {message}", self.base))),
            _ => Err(Failure::runtime(format!(
                "{url} answered {status}: {message}; is it a keel daemon of this version?"
            ))),
        }
    }

    /// `GET path` (under the base URL) as JSON.
    pub(crate) fn get(&self, path: &str) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let mut builder = self.client.get(&url);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        let answer = builder
            .send()
            .map_err(|e| Failure::runtime(format!("cannot reach {url}: {e}")))?;
        let status = answer.status();
        let value: Value = answer
            .json()
            .map_err(|e| Failure::runtime(format!("{url}: cannot read the answer: {e}")))?;
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        Err(match status {
            StatusCode::NOT_FOUND => Failure::NotFound(message),
            s if s.is_client_error() => Failure::input(message),
            _ => Failure::runtime(message),
        })
    }

    fn unreachable(&self, request: &Request, error: reqwest::Error) -> Failure {
        let after = if error.is_timeout() && !request.is_read() {
            " The command may still take effect: check before retrying."
        } else {
            ""
        };
        // reqwest's own message leaves the cause (a refused connection, a name that does not
        // resolve) to its sources.
        let mut why = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !why.contains(&text) {
                why = format!("{why}: {text}");
            }
            source = cause.source();
        }
        Failure::runtime(format!(
            "cannot reach the daemon at {}: {why}.{after}",
            self.base
        ))
    }
}

/// The first line of a token file.
fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::input(format!(
            "token file {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(Failure::input(format!(
            "token file {}: its first line is empty",
            path.display()
        )));
    }
    Ok(token)
}

//! Artifact checks (SPEC A2): what the driver does for `Effect::VerifyArtifacts`. The core
//! decides what to check and what passes (`keel_core::artifact`); this module only looks and
//! reports the facts as [`CheckResult`]s.
//!
//! - A URL gets one `GET`, following at most [`REDIRECTS_MAX`] redirects; the final status is
//!   reported, with the start of the body (at most
//!   [`limits::ARTIFACT_BODY_READ_MAX_BYTES`], read as it arrives, never the whole body).
//!   Checking URLs needs the `webhook` feature (the HTTP client); without it, a URL check
//!   fails with an error that says so, and the gate refuses rather than passes unchecked.
//! - A file is looked up (`metadata`) on this host; the excerpt says what was found.
//! - Each check is bounded by a timeout ([`limits::ARTIFACT_CHECK_TIMEOUT_MS`] by default):
//!   past it, the check fails with "timed out". The driver runs the checks on a task of their
//!   own, so a slow server never blocks it.

use std::time::Duration;

use keel_core::artifact::file_path;
use keel_core::{limits, ArtifactCheck, CheckResult, TargetKind};

/// Redirects a URL check follows before it reports the redirect itself.
pub const REDIRECTS_MAX: usize = 5;

/// Performs artifact checks. Cheap to clone: clones share one HTTP client.
#[derive(Clone, Debug)]
pub struct Verifier {
    #[cfg(feature = "webhook")]
    client: Result<reqwest::Client, String>,
    timeout: Duration,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new()
    }
}

impl Verifier {
    /// A verifier with the default timeout.
    pub fn new() -> Self {
        Verifier {
            #[cfg(feature = "webhook")]
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::limited(REDIRECTS_MAX))
                .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}")),
            timeout: Duration::from_millis(limits::ARTIFACT_CHECK_TIMEOUT_MS),
        }
    }

    /// The same, with another timeout per check.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Performs the checks one after the other; one result per check, in order.
    pub async fn check_all(&self, checks: &[ArtifactCheck]) -> Vec<CheckResult> {
        let mut results = Vec::with_capacity(checks.len());
        for check in checks {
            results.push(self.check(check).await);
        }
        results
    }

    /// [`Verifier::check_all`] for a caller outside any tokio runtime (a synchronous driver
    /// such as the CLI's direct mode): runs the checks on a runtime of its own. Panics if called
    /// from within a tokio runtime.
    pub fn check_all_blocking(&self, checks: &[ArtifactCheck]) -> Vec<CheckResult> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match runtime {
            Ok(runtime) => runtime.block_on(self.check_all(checks)),
            Err(e) => checks
                .iter()
                .map(|_| failed(format!("cannot start the checks: {e}")))
                .collect(),
        }
    }

    /// Performs one check, within the timeout.
    pub async fn check(&self, check: &ArtifactCheck) -> CheckResult {
        let look = async {
            match check.kind {
                TargetKind::Url => self.get(&check.target).await,
                TargetKind::File => look_up(&check.target).await,
            }
        };
        match tokio::time::timeout(self.timeout, look).await {
            Ok(result) => result,
            Err(_) => failed(format!("timed out after {} ms", self.timeout.as_millis())),
        }
    }

    #[cfg(feature = "webhook")]
    async fn get(&self, url: &str) -> CheckResult {
        let client = match &self.client {
            Ok(client) => client,
            Err(e) => return failed(e.clone()),
        };
        let mut response = match client.get(url).send().await {
            Ok(response) => response,
            Err(e) => return failed(error_chain(&e)),
        };
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while body.len() < limits::ARTIFACT_BODY_READ_MAX_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                // The status is what the gate judges; a body cut short is still an excerpt.
                Err(_) => break,
            }
        }
        body.truncate(limits::ARTIFACT_BODY_READ_MAX_BYTES);
        CheckResult {
            status: Some(status),
            error: None,
            excerpt: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    #[cfg(not(feature = "webhook"))]
    async fn get(&self, _url: &str) -> CheckResult {
        failed(
            "this keel was built without HTTP support (keel-runtime's `webhook` feature), so it \
             cannot check URLs"
                .into(),
        )
    }
}

/// Looks a file target up on this host.
async fn look_up(target: &str) -> CheckResult {
    let Some(path) = file_path(target) else {
        return failed(format!("{target:?} is not an absolute path or file:// URL"));
    };
    let path = path.to_owned();
    let found = tokio::task::spawn_blocking(move || std::fs::metadata(path)).await;
    let found = match found {
        Ok(found) => found,
        Err(e) => return failed(format!("the look-up did not finish: {e}")),
    };
    match found {
        Ok(meta) if meta.is_dir() => CheckResult {
            excerpt: "a directory".into(),
            ..CheckResult::default()
        },
        Ok(meta) => CheckResult {
            excerpt: format!("a file of {} bytes", meta.len()),
            ..CheckResult::default()
        },
        Err(e) => failed(e.to_string()),
    }
}

fn failed(error: String) -> CheckResult {
    CheckResult {
        status: None,
        error: Some(error),
        excerpt: String::new(),
    }
}

/// An error with its sources: reqwest's own message alone ("error sending request") hides the
/// cause (connection refused, DNS).
#[cfg(feature = "webhook")]
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! Prometheus rendering of the runtime's metrics ([`crate::metrics_names`]).
//!
//! **Off by default**: nothing is recorded until the application calls [`install_recorder`],
//! which installs a Prometheus recorder as the process's `metrics` recorder (once per process)
//! and returns its [`PrometheusHandle`]. Serve [`PrometheusHandle::render`] as `GET /metrics`
//! with the HTTP server the application already has (the keel daemon serves it on its HTTP
//! API, with axum), and call [`PrometheusHandle::run_upkeep`] every few seconds so that
//! histogram samples are drained. keel-runtime itself serves no HTTP. Histograms are exported
//! as summaries (the recorder's default).
//!
//! ```
//! let metrics = keel_runtime::prometheus::install_recorder().unwrap();
//! metrics::counter!(keel_runtime::metrics_names::RETRIES).increment(1);
//! assert!(metrics.render().contains("keel_retries_total 1"));
//! ```

use std::sync::Mutex;

use metrics_exporter_prometheus::PrometheusBuilder;
pub use metrics_exporter_prometheus::PrometheusHandle;

/// How often an application should run the recorder's upkeep.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder this module installed.
static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Why the recorder was not installed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecorderError {
    /// Another `metrics` recorder is installed in this process.
    #[error("cannot install the Prometheus recorder: {0}")]
    Installed(String),
}

/// Installs the Prometheus recorder as the process's `metrics` recorder, or returns the one
/// this module installed before. Fails if another recorder is installed.
pub fn install_recorder() -> Result<PrometheusHandle, RecorderError> {
    let mut installed = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| RecorderError::Installed(e.to_string()))?;
    *installed = Some(handle.clone());
    Ok(handle)
}

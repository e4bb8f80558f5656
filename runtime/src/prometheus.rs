//! An optional Prometheus endpoint for the runtime's metrics ([`crate::metrics_names`]).
//!
//! **Off by default**: nothing is recorded or served until the application calls [`serve`]
//! (or [`PrometheusExporter::serve`]). Then it installs a Prometheus recorder as the process's
//! `metrics` recorder and answers `GET /metrics` on the given address with the text exposition
//! format. Metrics say what runs and where results go, so the address must be a loopback one
//! (`127.0.0.1`, `::1`) unless [`PrometheusExporter::allow_non_loopback`] is set.
//!
//! ```no_run
//! # async fn example() -> Result<(), keel_runtime::prometheus::ServeError> {
//! let server = keel_runtime::prometheus::serve("127.0.0.1:9464".parse().unwrap()).await?;
//! println!("metrics at http://{}/metrics", server.local_addr());
//! // ... run keel; dropping `server` stops the endpoint.
//! # Ok(())
//! # }
//! ```
//!
//! The endpoint is a minimal HTTP/1.1 responder (one request per connection, `GET` and `HEAD`
//! of `/metrics`), served on the tokio runtime `serve` is called on; it needs no HTTP server
//! library. Histograms are exported as summaries (the recorder's default).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
pub use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Connections answered at once; more wait to be accepted.
pub const CONNECTIONS_MAX: usize = 16;

/// The longest request head (request line and headers) read before answering 431.
pub const REQUEST_HEAD_MAX_BYTES: usize = 8 * 1024;

/// How long a connection may take to send its request and read the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the recorder's upkeep (draining histogram samples) runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The recorder this module installed, shared by every server it starts.
static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Why the endpoint was not started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    /// The address is not a loopback one, and non-loopback addresses were not allowed.
    #[error("refusing to serve metrics on {0}, which is not a loopback address (allow non-loopback addresses explicitly to expose them)")]
    NonLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: String,
    },
    /// Another `metrics` recorder is installed in this process.
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
}

/// Serves the metrics on `addr`, which must be a loopback address; see the module docs.
pub async fn serve(addr: SocketAddr) -> Result<MetricsServer, ServeError> {
    PrometheusExporter::new(addr).serve().await
}

/// Configures the metrics endpoint.
#[derive(Clone, Copy, Debug)]
pub struct PrometheusExporter {
    addr: SocketAddr,
    allow_non_loopback: bool,
}

impl PrometheusExporter {
    /// An endpoint on `addr` (port 0: any free port, see [`MetricsServer::local_addr`]).
    pub fn new(addr: SocketAddr) -> Self {
        PrometheusExporter {
            addr,
            allow_non_loopback: false,
        }
    }

    /// Allows an address that is not loopback (`0.0.0.0`, a LAN address). Off by default.
    pub fn allow_non_loopback(mut self, allow: bool) -> Self {
        self.allow_non_loopback = allow;
        self
    }

    /// Checks the address, binds it, installs the recorder (once per process) and starts
    /// answering on the current tokio runtime.
    pub async fn serve(self) -> Result<MetricsServer, ServeError> {
        if !self.allow_non_loopback && !is_loopback(self.addr.ip()) {
            return Err(ServeError::NonLoopback(self.addr));
        }
        let bind_error = |e: io::Error| ServeError::Bind {
            addr: self.addr,
            error: e.to_string(),
        };
        let listener = TcpListener::bind(self.addr).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let handle = install_recorder()?;
        let task = tokio::spawn(accept_loop(listener, handle.clone()));
        tracing::info!(%local_addr, "serving Prometheus metrics at /metrics");
        Ok(MetricsServer {
            local_addr,
            handle,
            task,
        })
    }
}

/// Installs the Prometheus recorder as the process's `metrics` recorder, or returns the one
/// this module installed before. Fails if another recorder is installed. [`serve`] calls it;
/// call it directly to render the metrics without serving them (run
/// [`PrometheusHandle::run_upkeep`] now and then if so).
pub fn install_recorder() -> Result<PrometheusHandle, ServeError> {
    let mut installed = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| ServeError::Recorder(e.to_string()))?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// A running metrics endpoint. Dropping it (or [`MetricsServer::stop`]) stops answering; the
/// recorder stays installed, as a process has one.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    handle: PrometheusHandle,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen, if port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The recorder's handle, to render the metrics directly.
    pub fn handle(&self) -> &PrometheusHandle {
        &self.handle
    }

    /// Stops answering, and closes the listener and every open connection.
    pub fn stop(self) {}
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address, IPv4-mapped IPv6 (`::ffff:127.0.0.1`) included.
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Accepts connections and runs the upkeep. The connections live in a `JoinSet` owned here, so
/// aborting this task closes them too.
async fn accept_loop(listener: TcpListener, handle: PrometheusHandle) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        // Finished connections are reaped here, so the set holds at most CONNECTIONS_MAX.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
        };
        match accepted {
            Ok((stream, _)) => {
                let handle = handle.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    let answered =
                        tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &handle)).await;
                    if let Ok(Err(e)) = answered {
                        tracing::debug!(error = %e, "metrics connection failed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors, say: keep serving the connections that are open.
                tracing::warn!(error = %e, "cannot accept a metrics connection");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Reads one request and answers it; the connection then closes.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
    };
    let mut request_line = head.lines().next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default();
    let target = request_line.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "",
            "metrics are at /metrics\n",
        )
        .await;
    }
    match method {
        "GET" => {
            let body = handle.render();
            respond(&mut stream, "200 OK", "", &body).await
        }
        "HEAD" => {
            let length = handle.render().len();
            let head = response_head("200 OK", "", length);
            stream.write_all(head.as_bytes()).await?;
            stream.shutdown().await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "",
            )
            .await
        }
    }
}

/// The request head up to its blank line; `None` if it is longer than
/// [`REQUEST_HEAD_MAX_BYTES`]. A connection closed early yields what came.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > REQUEST_HEAD_MAX_BYTES {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    extra_headers: &str,
    body: &str,
) -> io::Result<()> {
    let head = response_head(status, extra_headers, body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn response_head(status: &str, extra_headers: &str, content_length: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {content_length}\r\n{extra_headers}Connection: close\r\n\r\n"
    )
}

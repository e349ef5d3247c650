//! Docker's volume plugin protocol over HTTP/1.1 on a unix socket: the listener, its
//! limits (body size, header and body timeouts), per-request ids in the logs, and
//! socket hygiene (mode 0660, stale socket replaced, removed on exit).

pub mod csi;
pub mod protocol;
pub mod router;
pub mod tls;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::controller::Controller;
use crate::error::{Error, Result};
use crate::node::Node;
use router::Reply;

/// The two halves a front end drives: the cluster-side lifecycle and this host's side.
pub struct Backends {
    pub controller: Controller,
    pub node: Node,
}

/// Docker's requests are tiny; anything near this is not from dockerd.
pub const MAX_BODY: usize = 1 << 20;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// Binds the plugin socket: refuses a world-writable directory, replaces a stale socket
/// (but never one another process is serving), and sets mode 0660.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Config(format!("socket path {} has no directory", path.display())))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .permissions()
        .mode();
    // Sticky world-writable dirs (/tmp) still let others pre-create names: refuse them too.
    if mode & 0o002 != 0 {
        return Err(Error::Config(format!(
            "socket directory {} is world-writable (mode {:o}); anyone could replace the socket. Use a root-owned directory such as /run/docker/plugins",
            dir.display(),
            mode & 0o7777
        )));
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::Config(format!(
                "another process is serving {}; stop it or choose another --socket",
                path.display()
            )));
        }
        tracing::info!(socket = %path.display(), "replacing stale socket");
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale {}", path.display()), e))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Removes the socket file when dropped, so a stopped plugin leaves no stale socket
/// (a stale socket costs every `docker volume ls` 15 s of retries).
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves connections until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    driver: Arc<Backends>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, driver.clone()));
    }
}

/// Serves HTTP/1.1 requests on one connection (unix socket or TLS stream) until the
/// client closes it or stalls sending headers.
pub async fn serve_connection<IO>(io: IO, driver: Arc<Backends>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(driver.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended");
    }
}

type Body = Full<Bytes>;

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/vnd.docker.plugins.v1.2+json"),
    );
    resp
}

/// The error a service returns makes hyper close the connection unanswered.
#[derive(Debug)]
struct Aborted;
impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request aborted on purpose")
    }
}
impl std::error::Error for Aborted {}

async fn handle(
    driver: Arc<Backends>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, Aborted> {
    let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("req", id, endpoint = %path);
    async move {
        let started = std::time::Instant::now();
        let reply = answer(driver, req, &path).await;
        let elapsed = started.elapsed().as_secs_f64();
        let elapsed_ms = elapsed * 1000.0;
        let outcome = match &reply {
            Reply::Json(_, v) if v.get("Err").is_some() => "error",
            Reply::Json(..) => "ok",
            Reply::Abort => "aborted",
        };
        crate::metrics::request(&path, outcome, elapsed);
        match reply {
            Reply::Json(status, value) => {
                tracing::debug!(status = status.as_u16(), elapsed_ms, "answered");
                Ok(json_response(status, value))
            }
            Reply::Abort => Err(Aborted),
        }
    }
    .instrument(span)
    .await
}

async fn answer(driver: Arc<Backends>, req: Request<Incoming>, path: &str) -> Reply {
    if req.method() != Method::POST {
        return Reply::Json(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "Err": format!("{} {path}: the plugin protocol uses POST", req.method()) }),
        );
    }
    let limited = Limited::new(req.into_body(), MAX_BODY);
    let body = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Reply::Json(
                StatusCode::REQUEST_TIMEOUT,
                json!({ "Err": format!("request body not received within {}s", BODY_TIMEOUT.as_secs()) }),
            )
        }
        Ok(Err(e)) => {
            return Reply::Json(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "Err": format!("request body refused ({e}); the limit is {MAX_BODY} bytes") }),
            )
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // The work runs in a task of its own: when the client goes away (Docker drops the
    // connection at its deadline), hyper drops this future, but a Mount half done -
    // an exporter holding the lock, a loop device, a mount - must run to completion
    // (or undo itself) rather than be cut off with nothing recorded. What it leaves
    // referenced that no container uses is released as an orphan.
    let path = path.to_string();
    let span = tracing::Span::current();
    let work =
        tokio::spawn(async move { router::dispatch(&driver, &path, &body).await }.instrument(span));
    match work.await {
        Ok(reply) => reply,
        Err(e) => Reply::Json(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "Err": format!("the request failed inside rbdvol: {e}; see the daemon log") }),
        ),
    }
}

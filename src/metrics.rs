//! Prometheus metrics, off unless `[metrics] listen` is set. Recording goes through the
//! free functions here, which do nothing until [`install`] ran (so unit tests and the
//! other commands pay nothing); the daemon serves `/metrics` on that address.
//!
//! Encoding is the `prometheus-client` crate's (maintained by the Prometheus project;
//! OpenMetrics text, which Prometheus scrapes natively), not hand-written text: label
//! escaping, `_total` suffixes, histogram buckets and `# EOF` are its job.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::host::mapper::userspace::state::IoStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Volume {
    volume: String,
}

/// What the node has mounted right now, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub volumes: i64,
    pub references: i64,
    pub exporters: i64,
    pub fenced: i64,
    /// Each userspace-mapped volume's exporter counters ("pool/name").
    pub io: Vec<(String, IoStats)>,
}

type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RequestLabels, Histogram>,
    events: Family<Kind, Counter>,
    reconcile: Family<Kind, Counter>,
    ceph_connected: Gauge,
    ceph_connects: Family<Kind, Counter>,
    mounted: Gauge,
    references: Gauge,
    exporters: Gauge,
    fenced: Gauge,
    lock_wait: Histogram,
    /// Per volume: read bytes, written bytes, read errors, write errors.
    io: [Family<Volume, Gauge>; 4],
    snapshot: OnceLock<SnapshotFn>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

fn new_metrics() -> Metrics {
    let mut registry = Registry::with_prefix("rbdvol");
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "requests",
        "Docker plugin requests by endpoint and outcome (ok, error, aborted)",
        requests.clone(),
    );
    let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.001, 4.0, 10))
    });
    registry.register(
        "request_duration_seconds",
        "Time to answer a Docker plugin request",
        latency.clone(),
    );
    let events = Family::<Kind, Counter>::default();
    registry.register(
        "lock_events",
        "Ownership events on this host: takeover (a dead owner declared dead, fenced and its lock taken), mount_refused (the lock wait ran out: held elsewhere), fenced (this host lost a volume), blocklist_cleanup / blocklist_cleanup_failed (this host's exited, fenced client removed from the blocklist), orphan_released",
        events.clone(),
    );
    let reconcile = Family::<Kind, Counter>::default();
    registry.register("reconcile_decisions", "What reconcile did with each recorded volume or leftover: adopted, fenced, released, release_failed, untracked_unmounted, untracked_in_use, mapping_released", reconcile.clone());
    let ceph_connected = Gauge::default();
    registry.register(
        "ceph_connected",
        "1 while the daemon holds a live connection to the cluster",
        ceph_connected.clone(),
    );
    let ceph_connects = Family::<Kind, Counter>::default();
    registry.register(
        "ceph_connection_changes",
        "Cluster connection changes: connected, failed, retired",
        ceph_connects.clone(),
    );
    let mounted = Gauge::default();
    registry.register(
        "mounted_volumes",
        "Volumes mounted on this host",
        mounted.clone(),
    );
    let references = Gauge::default();
    registry.register(
        "volume_references",
        "Container mounts (Docker Mount references) of volumes on this host",
        references.clone(),
    );
    let exporters = Gauge::default();
    registry.register(
        "exporters",
        "Userspace exporter processes serving volumes mounted here",
        exporters.clone(),
    );
    let fenced = Gauge::default();
    registry.register(
        "fenced_volumes",
        "Volumes mounted here whose lock this host has lost",
        fenced.clone(),
    );
    let lock_wait = Histogram::new(exponential_buckets(0.01, 3.0, 10));
    registry.register(
        "lock_wait_seconds",
        "How long a new mapping on this host waited for the volume's exclusive lock (a takeover waits for the dead owner's watch to expire)",
        lock_wait.clone(),
    );
    let io: [Family<Volume, Gauge>; 4] = Default::default();
    for (family, (name, help)) in io.iter().zip([
        (
            "exporter_read_bytes",
            "Bytes this volume's exporter has read from the image since it started",
        ),
        (
            "exporter_written_bytes",
            "Bytes this volume's exporter has written to the image since it started",
        ),
        (
            "exporter_read_errors",
            "Reads this volume's exporter failed (EIO to the kernel) since it started",
        ),
        (
            "exporter_write_errors",
            "Writes this volume's exporter failed (EIO to the kernel) since it started",
        ),
    ]) {
        registry.register(name, help, family.clone());
    }
    Metrics {
        registry,
        io,
        lock_wait,
        requests,
        latency,
        events,
        reconcile,
        ceph_connected,
        ceph_connects,
        mounted,
        references,
        exporters,
        fenced,
        snapshot: OnceLock::new(),
    }
}

/// Turns recording on (idempotent). `snapshot` is read at every scrape.
pub fn install(snapshot: impl Fn() -> Snapshot + Send + Sync + 'static) {
    let m = METRICS.get_or_init(new_metrics);
    let _ = m.snapshot.set(Arc::new(snapshot));
}

fn kind(k: &str) -> Kind {
    Kind {
        kind: k.to_string(),
    }
}

/// One answered request. Unknown paths are counted as "other" (bounded labels).
pub fn request(endpoint: &str, outcome: &str, seconds: f64) {
    if let Some(m) = METRICS.get() {
        let endpoint = if crate::api::router::ENDPOINTS.contains(&endpoint) {
            endpoint
        } else {
            "other"
        };
        let l = RequestLabels {
            endpoint: endpoint.to_string(),
            outcome: outcome.to_string(),
        };
        m.requests.get_or_create(&l).inc();
        m.latency.get_or_create(&l).observe(seconds);
    }
}

pub fn event(k: &str) {
    if let Some(m) = METRICS.get() {
        m.events.get_or_create(&kind(k)).inc();
    }
}

/// A mapping took the volume's lock after `waited_s`; `took_over` when it first
/// declared a dead owner dead and fenced it (counted as `lock_events{kind="takeover"}`).
pub fn lock_taken(waited_s: f64, took_over: bool) {
    if let Some(m) = METRICS.get() {
        m.lock_wait.observe(waited_s);
        if took_over {
            m.events.get_or_create(&kind("takeover")).inc();
        }
    }
}

pub fn reconcile(decision: &str) {
    if let Some(m) = METRICS.get() {
        m.reconcile.get_or_create(&kind(decision)).inc();
    }
}

/// "connected", "failed" or "retired".
pub fn ceph_connection(change: &str) {
    if let Some(m) = METRICS.get() {
        m.ceph_connects.get_or_create(&kind(change)).inc();
        match change {
            "connected" => m.ceph_connected.set(1),
            _ => m.ceph_connected.set(0),
        };
    }
}

/// The exposition text, or `None` when metrics are off.
pub fn render() -> Option<String> {
    let m = METRICS.get()?;
    if let Some(f) = m.snapshot.get() {
        let s = f();
        m.mounted.set(s.volumes);
        m.references.set(s.references);
        m.exporters.set(s.exporters);
        m.fenced.set(s.fenced);
        // Volumes no longer mounted here drop out of the exposition.
        for family in &m.io {
            family.clear();
        }
        for (volume, io) in &s.io {
            let l = Volume {
                volume: volume.clone(),
            };
            let values = [
                io.read_bytes,
                io.write_bytes,
                io.read_errors,
                io.write_errors,
            ];
            for (family, v) in m.io.iter().zip(values) {
                family
                    .get_or_create(&l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry).ok()?;
    Some(out)
}

/// Binds the metrics listener (at start, so a taken port stops the daemon, not a scrape).
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Error::io(
            format!("binding the metrics listener {listen} (metrics.listen)"),
            e,
        )
    })
}

/// Serves `GET /metrics` until `shutdown` resolves. Plain HTTP: keep it on loopback or
/// a scrape network.
pub async fn serve(tcp: tokio::net::TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    tracing::info!(addr = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving metrics at /metrics");
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            a = tcp.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let resp = match (req.uri().path(), render()) {
                        ("/metrics", Some(text)) => Response::builder()
                            .header(
                                hyper::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(text))),
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from("see /metrics\n"))),
                    };
                    Ok::<_, hyper::http::Error>(resp.expect("static response parts"))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_shows_in_the_exposition() {
        install(|| Snapshot {
            volumes: 2,
            references: 3,
            exporters: 1,
            fenced: 0,
            io: vec![(
                "rbd/pg".into(),
                IoStats {
                    read_bytes: 512,
                    write_bytes: 4096,
                    read_errors: 0,
                    write_errors: 1,
                },
            )],
        });
        request("/VolumeDriver.Mount", "ok", 0.02);
        request("/nonsense", "error", 0.001);
        event("fenced");
        reconcile("adopted");
        ceph_connection("connected");
        let text = render().unwrap();
        for needle in [
            "rbdvol_requests_total{endpoint=\"/VolumeDriver.Mount\",outcome=\"ok\"} 1",
            "rbdvol_requests_total{endpoint=\"other\",outcome=\"error\"} 1",
            "rbdvol_request_duration_seconds_bucket{le=",
            "rbdvol_lock_events_total{kind=\"fenced\"} 1",
            "rbdvol_reconcile_decisions_total{kind=\"adopted\"} 1",
            "rbdvol_ceph_connected 1",
            "rbdvol_mounted_volumes 2",
            "rbdvol_volume_references 3",
            "rbdvol_exporter_written_bytes{volume=\"rbd/pg\"} 4096",
            "rbdvol_exporter_write_errors{volume=\"rbd/pg\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
}

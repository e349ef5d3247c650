//! The cluster side: one long-lived RADOS connection for the daemon's control plane
//! (create, list, inspect, remove), reconnected after failure, and every blocking
//! librados/librbd call run off the async runtime under a deadline.
//!
//! The daemon's connection never holds an image's exclusive lock: a lock break fences
//! the whole client instance, so locks belong to per-volume connections (the mappers).

pub mod images;
pub mod liveness;
pub mod ops;
pub mod snapshots;
pub mod sys;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::CephSettings;
use crate::error::{Error, Result};

pub use ops::{ClusterOps, LONG_DEADLINE, SHORT_DEADLINE};
pub use sys::{ConnectSpec, Errno, Rados};

/// Builds the connection parameters shared by the daemon and the per-volume mappers.
pub fn connect_spec(settings: &CephSettings) -> ConnectSpec {
    let secs = |d: Duration| d.as_secs().max(1).to_string();
    ConnectSpec {
        cluster: settings.cluster.clone(),
        entity: format!("client.{}", settings.client_id),
        conf: Some(settings.conf.display().to_string()),
        keyring: settings
            .keyring
            .as_ref()
            .map(|k: &PathBuf| k.display().to_string()),
        options: vec![
            ("rados_mon_op_timeout".into(), secs(settings.op_timeout)),
            ("rados_osd_op_timeout".into(), secs(settings.op_timeout)),
            (
                "client_mount_timeout".into(),
                secs(settings.connect_timeout),
            ),
        ],
    }
}

/// Errors after which the connection is presumed dead (fenced, shut down, timed out).
fn poisons_connection(errno: i32) -> bool {
    // Ceph reports a blocklisted client as ESHUTDOWN (108) on Linux.
    matches!(errno, libc::ESHUTDOWN | libc::ENOTCONN | libc::ETIMEDOUT)
}

/// The daemon's connection to the cluster.
pub struct Cluster {
    spec: ConnectSpec,
    conn: Mutex<Option<Arc<Rados>>>,
    /// Serialises connection attempts so a burst of calls makes one attempt, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl Cluster {
    pub fn new(spec: ConnectSpec) -> Cluster {
        Cluster {
            spec,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn spec(&self) -> &ConnectSpec {
        &self.spec
    }

    fn current(&self) -> Option<Arc<Rados>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Returns the live connection, connecting if there is none.
    pub async fn connection(&self, deadline: Duration) -> Result<Arc<Rados>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let spec = self.spec.clone();
        let attempt = tokio::task::spawn_blocking(move || Rados::connect(&spec));
        let result = tokio::time::timeout(deadline, attempt).await;
        let ok = matches!(result, Ok(Ok(Ok(_))));
        crate::metrics::ceph_connection(if ok { "connected" } else { "failed" });
        let rados = match result {
            Err(_) => {
                return Err(Error::Timeout {
                    op: "connecting to the ceph cluster".into(),
                    after: deadline,
                })
            }
            Ok(Err(join)) => return Err(Error::Unavailable(format!("connect task: {join}"))),
            Ok(Ok(Err((step, errno)))) => {
                return Err(Error::Unavailable(format!(
                    "{step}: {} (conf {})",
                    errno.describe(),
                    self.spec.conf.as_deref().unwrap_or("default")
                )))
            }
            Ok(Ok(Ok(r))) => Arc::new(r),
        };
        tracing::info!(
            client = %format!("client.{}", rados.instance_id()),
            addr = %rados.addrs().unwrap_or_default(),
            "connected to the ceph cluster"
        );
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(rados.clone());
        Ok(rados)
    }

    /// Drops the connection so the next call reconnects.
    fn retire(&self, rados: &Arc<Rados>) {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, rados)) {
            tracing::warn!("retiring the ceph connection; the next call reconnects");
            crate::metrics::ceph_connection("retired");
            *slot = None;
        }
    }

    /// Runs `f` on a blocking thread with the connection, bounded by `deadline`.
    /// A call that overruns keeps its thread until librados' own timeouts end it; the
    /// caller gets a clear error at once.
    pub async fn run<T, F>(&self, op: &str, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Rados) -> Result<T> + Send + 'static,
    {
        let started = tokio::time::Instant::now();
        let rados = self.connection(deadline).await?;
        let remaining = deadline.saturating_sub(started.elapsed());
        let conn = rados.clone();
        let task = tokio::task::spawn_blocking(move || f(&conn));
        let outcome = match tokio::time::timeout(remaining, task).await {
            Err(_) => {
                self.retire(&rados);
                return Err(Error::Timeout {
                    op: op.to_string(),
                    after: deadline,
                });
            }
            Ok(Err(join)) => return Err(Error::Unavailable(format!("{op} task: {join}"))),
            Ok(Ok(r)) => r,
        };
        if let Err(Error::Ceph { errno, .. }) = &outcome {
            if poisons_connection(*errno) {
                self.retire(&rados);
                return outcome.map_err(|e| Error::Unavailable(e.to_string()));
            }
        }
        outcome
    }
}

/// Turns an errno from librbd into [`Error::Ceph`] with the operation named.
pub fn ceph_err(op: impl Into<String>, errno: Errno) -> Error {
    Error::Ceph {
        op: op.into(),
        errno: errno.0,
        detail: errno.describe(),
    }
}

//! The holder's side of [`crate::volume::control`]: this daemon watches one object per
//! volume mounted here, and answers a freeze (through a `freeze-guard` child, so the
//! filesystem is thawed even if this daemon dies), a thaw, or an online grow. The
//! watches live on a cluster connection of their own, kept in step with what is
//! mounted by [`Control::sync`], which the daemon calls every second.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use crate::ceph::sys::{ConnectSpec, Notification, OnNotify, Rados, Watch};
use crate::host::freeze::Frozen;
use crate::volume::control::{self, Reply, Request};

/// A volume mounted here, as the holder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pool: String,
    pub mountpoint: PathBuf,
    pub device: PathBuf,
    pub fstype: String,
    pub read_only: bool,
}

struct Watched {
    name: String,
    target: Target,
    watch: Watch,
    /// Freezes under way, by request id. Dropping one thaws.
    freezes: Mutex<HashMap<String, Frozen>>,
}

pub struct Control {
    host_id: String,
    spec: ConnectSpec,
    /// The rbdvol binary, to start freeze guards.
    exe: PathBuf,
    rt: tokio::runtime::Handle,
    conn: Mutex<Option<Arc<Rados>>>,
    watches: Mutex<HashMap<String, Arc<Watched>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Control {
    pub fn new(
        host_id: String,
        spec: ConnectSpec,
        exe: PathBuf,
        rt: tokio::runtime::Handle,
    ) -> Arc<Control> {
        Arc::new(Control {
            host_id,
            spec,
            exe,
            rt,
            conn: Mutex::new(None),
            watches: Mutex::new(HashMap::new()),
        })
    }

    fn connection(&self) -> Option<Arc<Rados>> {
        let mut c = lock(&self.conn);
        if c.is_none() {
            match Rados::connect(&self.spec) {
                Ok(r) => *c = Some(Arc::new(r)),
                Err((step, e)) => {
                    tracing::warn!(step, error = %e.describe(), "cannot connect for snapshot and resize requests; retrying");
                }
            }
        }
        c.clone()
    }

    /// Watches exactly the volumes in `mounted` (by name). Blocking: run it off the
    /// async runtime.
    pub fn sync(&self, mounted: BTreeMap<String, Target>) {
        let mut watches = lock(&self.watches);
        // Gone, changed, or lost (the watch error callback fired): watch again below.
        watches.retain(|name, w| mounted.get(name) == Some(&w.target) && w.watch.check().is_ok());
        let missing: Vec<(String, Target)> = mounted
            .into_iter()
            .filter(|(n, _)| !watches.contains_key(n))
            .collect();
        if missing.is_empty() {
            return;
        }
        let Some(rados) = self.connection() else {
            return;
        };
        for (name, target) in missing {
            if !target.read_only {
                // A volume newly watched may have been left frozen by a freeze guard
                // that was killed outright (its own thaw never ran): thaw it.
                // Thawing a filesystem that is not frozen does nothing.
                let mp = target.mountpoint.clone();
                let _ = self.rt.block_on(crate::host::freeze::thaw(&mp));
            }
            let (tx, rx) = mpsc::channel();
            let oid = control::object(&name);
            let watched = rados
                .pool(&target.pool)
                .and_then(|p| p.touch_object(&oid))
                .and_then(|_| {
                    Watch::start(
                        rados.clone(),
                        &target.pool,
                        &oid,
                        Duration::ZERO,
                        OnNotify::Deliver(tx),
                    )
                });
            match watched {
                Ok(watch) => {
                    let w = Arc::new(Watched {
                        name: name.clone(),
                        target,
                        watch,
                        freezes: Mutex::new(HashMap::new()),
                    });
                    let weak = Arc::downgrade(&w);
                    let me = ControlRef {
                        host_id: self.host_id.clone(),
                        exe: self.exe.clone(),
                        rt: self.rt.clone(),
                    };
                    std::thread::spawn(move || me.serve(weak, rx));
                    tracing::info!(volume = %name, "answering snapshot and resize requests for the volume");
                    watches.insert(name, w);
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e.describe(), "cannot watch for snapshot and resize requests; retrying");
                    if matches!(e.0, libc::ESHUTDOWN | libc::ENOTCONN | libc::ETIMEDOUT) {
                        *lock(&self.conn) = None;
                    }
                }
            }
        }
    }
}

/// What a watch's thread needs (not the whole [`Control`], so no cycle keeps it alive).
struct ControlRef {
    host_id: String,
    exe: PathBuf,
    rt: tokio::runtime::Handle,
}

impl ControlRef {
    /// Answers the watch's notifications until the watch is dropped.
    fn serve(&self, watched: Weak<Watched>, rx: mpsc::Receiver<Notification>) {
        while let Ok(n) = rx.recv() {
            let Some(w) = watched.upgrade() else { break };
            let reply = self.answer(&w, &n);
            if let Err(e) = w.watch.ack(&n, &reply.to_bytes()) {
                tracing::warn!(volume = %w.name, error = %e.describe(), "could not answer a request");
            }
        }
    }

    fn answer(&self, w: &Watched, n: &Notification) -> Reply {
        let reply = |r: std::result::Result<(), String>| Reply {
            host: self.host_id.clone(),
            ok: r.is_ok(),
            error: r.err(),
        };
        let req: Request = match serde_json::from_slice(&n.payload) {
            Ok(r) => r,
            Err(e) => return reply(Err(format!("unreadable request: {e}"))),
        };
        if req.volume() != w.name {
            return reply(Err(format!("this watch is for volume {}", w.name)));
        }
        let t = &w.target;
        match req {
            // A read-only mount does not change: nothing to freeze.
            Request::Freeze { .. } if t.read_only => reply(Ok(())),
            Request::Freeze { id, max_secs, .. } => {
                let max = Duration::from_secs(max_secs).min(control::MAX_FREEZE);
                match Frozen::start(&self.exe, &t.mountpoint, max, control::ANSWER_WITHIN) {
                    Ok(f) => {
                        tracing::info!(volume = %w.name, request = %id, "froze the filesystem for a snapshot");
                        lock(&w.freezes).insert(id, f);
                        reply(Ok(()))
                    }
                    Err(e) => reply(Err(e.to_string())),
                }
            }
            Request::Thaw { id, .. } => {
                // Tests kill the daemon here, while the filesystem is frozen.
                crate::failpoint::crash_point("control:before-thaw");
                // Already thawed (time limit) counts as done.
                if let Some(mut f) = lock(&w.freezes).remove(&id) {
                    let said = f.finish(Duration::from_secs(25));
                    tracing::info!(volume = %w.name, request = %id, guard = %said, "thawed the filesystem");
                }
                reply(Ok(()))
            }
            Request::Grow { .. } if t.read_only => reply(Err(
                "it is mounted read-only here; it grows at its next writable Mount".into(),
            )),
            Request::Grow { size, .. } => {
                let r = self.rt.block_on(crate::host::grow::grow_online(
                    &t.fstype,
                    &t.device,
                    &t.mountpoint,
                    size,
                ));
                match &r {
                    Ok(()) => tracing::info!(volume = %w.name, size, "grew the mounted filesystem"),
                    Err(e) => {
                        tracing::warn!(volume = %w.name, error = %e, "could not grow the mounted filesystem")
                    }
                }
                reply(r.map_err(|e| e.to_string()))
            }
        }
    }
}

//! The cluster operations the controller and the node make, behind one narrow trait:
//! [`Cluster`] does them against Ceph (off the runtime, under Docker's deadlines), and
//! a fake in `crate::testing` does them in memory, so that the decisions above them
//! (idempotent Create, Get while the cluster is unreachable, rollback of a failed
//! Mount, reconcile) are tested without root and without a cluster.

use std::time::Duration;

use async_trait::async_trait;

use super::images::{self, Created, Disposal, ImageFacts};
use super::snapshots::{self, CloneSource, Snapshot};
use super::sys::{CreateSpec, NotifyReplies};
use super::Cluster;
use crate::error::{Error, Result};

/// Docker gives Create and Mount 2 minutes, everything else 1 minute; stay inside.
pub const LONG_DEADLINE: Duration = Duration::from_secs(100);
pub const SHORT_DEADLINE: Duration = Duration::from_secs(45);

/// Metadata pairs to write (`Some`) or remove (`None`), keys without the prefix.
pub type MetaChanges = Vec<(&'static str, Option<String>)>;

#[async_trait]
pub trait ClusterOps: Send + Sync {
    /// The image `name` in the first of `pools` that has it, described.
    async fn describe(&self, pools: Vec<String>, name: &str) -> Result<Option<ImageFacts>>;
    /// Image names in `pools`, one listing per pool.
    async fn list(&self, pools: Vec<String>, hint: usize) -> Result<Vec<String>>;
    async fn create(
        &self,
        pool: &str,
        name: &str,
        spec: CreateSpec,
        meta: Vec<(String, String)>,
    ) -> Result<Created>;
    async fn remove(&self, pools: Vec<String>, name: &str, how: Disposal) -> Result<()>;
    async fn set_meta(&self, pool: &str, name: &str, changes: MetaChanges) -> Result<()>;
    /// Whether any part of the image was ever written (librbd's allocation map).
    async fn has_data(&self, pool: &str, name: &str) -> Result<bool>;
    /// Removes a blocklist entry of a client that is gone for good.
    async fn unblocklist(&self, addr: &str) -> Result<()>;
    /// The monitors' messengers and the ms_*_mode settings (for krbd's `ms_mode`).
    async fn messenger(&self) -> Result<Messenger>;
    /// Whether the client instance `addr` is on the OSD blocklist (fenced).
    async fn is_blocklisted(&self, addr: &str) -> Result<bool>;

    // Day-two operations (see `super::snapshots`). The in-memory fake has none, so
    // they default to "not supported" there.
    async fn snapshots(&self, _pool: &str, _name: &str) -> Result<Vec<Snapshot>> {
        Err(unsupported())
    }
    async fn snap_create(&self, _pool: &str, _name: &str, _snap: &str) -> Result<()> {
        Err(unsupported())
    }
    async fn snap_remove(&self, _pool: &str, _name: &str, _snap: &str) -> Result<()> {
        Err(unsupported())
    }
    async fn rollback(&self, _pool: &str, _name: &str, _snap: &str) -> Result<()> {
        Err(unsupported())
    }
    async fn clone_volume(
        &self,
        _src: CloneSource,
        _pool: &str,
        _name: &str,
        _meta: Vec<(String, String)>,
    ) -> Result<Created> {
        Err(unsupported())
    }
    /// Grows the image and marks its filesystem for growing; returns the old size.
    async fn resize(&self, _pool: &str, _name: &str, _size: u64, _mark: String) -> Result<u64> {
        Err(unsupported())
    }
    /// Notifies the watchers of `pool/oid` and collects their answers within `timeout`.
    async fn notify(
        &self,
        _pool: &str,
        _oid: &str,
        _payload: Vec<u8>,
        _timeout: Duration,
    ) -> Result<NotifyReplies> {
        Err(unsupported())
    }
}

/// The monitors' messengers (from the monmap) and this client's `ms_*_mode` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Messenger {
    pub mon_v1: bool,
    pub mon_v2: bool,
    /// `ms_client_mode`.
    pub client_mode: String,
    /// `ms_mon_client_mode`, `ms_service_mode`, `ms_mon_service_mode`.
    pub other_modes: Vec<String>,
}

/// Reads the monitors' address kinds from `mon dump --format json`.
fn mon_kinds(monmap_json: &str) -> Result<(bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(monmap_json).map_err(|e| Error::Ceph {
        op: "reading the monitor map".into(),
        errno: libc::EINVAL,
        detail: e.to_string(),
    })?;
    let (mut v1, mut v2) = (false, false);
    for mon in v["mons"].as_array().into_iter().flatten() {
        for a in mon["public_addrs"]["addrvec"]
            .as_array()
            .into_iter()
            .flatten()
        {
            match a["type"].as_str() {
                Some("v1") => v1 = true,
                Some("v2") => v2 = true,
                _ => {}
            }
        }
    }
    Ok((v1, v2))
}

/// Reads [`Messenger`] through the daemon's connection: `mon dump` (which `profile rbd`
/// allows) and the configuration values.
fn messenger(rados: &super::sys::Rados) -> Result<Messenger> {
    let cmd = serde_json::json!({ "prefix": "mon dump", "format": "json" }).to_string();
    let (out, _) = rados.mon_command(&cmd).map_err(|(e, status)| Error::Ceph {
        op: "reading the monitor map".into(),
        errno: e.0,
        detail: format!("{} {status}", e.describe()),
    })?;
    let (mon_v1, mon_v2) = mon_kinds(&out)?;
    let get = |k: &str| {
        rados
            .conf_get(k)
            .map_err(|e| super::ceph_err(format!("reading the setting {k}"), e))
    };
    Ok(Messenger {
        mon_v1,
        mon_v2,
        client_mode: get("ms_client_mode")?,
        other_modes: vec![
            get("ms_mon_client_mode")?,
            get("ms_service_mode")?,
            get("ms_mon_service_mode")?,
        ],
    })
}

fn unsupported() -> crate::error::Error {
    crate::error::Error::NotSupported("snapshots, clones and resize need a real cluster".into())
}

#[async_trait]
impl ClusterOps for Cluster {
    async fn describe(&self, pools: Vec<String>, name: &str) -> Result<Option<ImageFacts>> {
        let n = name.to_string();
        self.run("reading volume", SHORT_DEADLINE, move |r| {
            images::describe_in(r, &pools, &n)
        })
        .await
    }

    async fn list(&self, pools: Vec<String>, hint: usize) -> Result<Vec<String>> {
        self.run("listing volumes", SHORT_DEADLINE, move |r| {
            let mut all = Vec::with_capacity(hint);
            for pool in &pools {
                all.extend(images::list(r, pool, hint)?);
            }
            Ok(all)
        })
        .await
    }

    async fn create(
        &self,
        pool: &str,
        name: &str,
        spec: CreateSpec,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("creating volume", LONG_DEADLINE, move |r| {
            images::create(r, &pool, &name, &spec, &meta)
        })
        .await
    }

    async fn remove(&self, pools: Vec<String>, name: &str, how: Disposal) -> Result<()> {
        let n = name.to_string();
        self.run("removing volume", SHORT_DEADLINE, move |r| {
            images::remove(r, &pools, &n, how)
        })
        .await
    }

    async fn set_meta(&self, pool: &str, name: &str, changes: MetaChanges) -> Result<()> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("writing volume metadata", SHORT_DEADLINE, move |r| {
            images::set_meta(r, &pool, &name, &changes)
        })
        .await
    }

    async fn has_data(&self, pool: &str, name: &str) -> Result<bool> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("reading the allocation map", LONG_DEADLINE, move |r| {
            images::has_data(r, &pool, &name)
        })
        .await
    }

    async fn messenger(&self) -> Result<Messenger> {
        self.run("reading the messenger settings", SHORT_DEADLINE, messenger)
            .await
    }

    async fn is_blocklisted(&self, addr: &str) -> Result<bool> {
        let a = addr.to_string();
        self.run("reading the blocklist", SHORT_DEADLINE, move |r| {
            images::blocklisted_until(r, &a).map(|u| u.is_some())
        })
        .await
    }

    async fn unblocklist(&self, addr: &str) -> Result<()> {
        let a = addr.to_string();
        self.run("cleaning the blocklist", SHORT_DEADLINE, move |r| {
            images::unblocklist(r, &a)
        })
        .await
    }

    async fn snapshots(&self, pool: &str, name: &str) -> Result<Vec<Snapshot>> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("listing snapshots", SHORT_DEADLINE, move |r| {
            snapshots::list(r, &pool, &name)
        })
        .await
    }

    async fn snap_create(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        let (pool, name, snap) = (pool.to_string(), name.to_string(), snap.to_string());
        self.run("creating a snapshot", SHORT_DEADLINE, move |r| {
            snapshots::create(r, &pool, &name, &snap)
        })
        .await
    }

    async fn snap_remove(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        let (pool, name, snap) = (pool.to_string(), name.to_string(), snap.to_string());
        self.run("removing a snapshot", SHORT_DEADLINE, move |r| {
            snapshots::remove(r, &pool, &name, &snap)
        })
        .await
    }

    async fn rollback(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        let (pool, name, snap) = (pool.to_string(), name.to_string(), snap.to_string());
        self.run("rolling back to a snapshot", LONG_DEADLINE, move |r| {
            snapshots::rollback(r, &pool, &name, &snap)
        })
        .await
    }

    async fn clone_volume(
        &self,
        src: CloneSource,
        pool: &str,
        name: &str,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("cloning a volume", LONG_DEADLINE, move |r| {
            snapshots::clone(r, &src, &pool, &name, &meta)
        })
        .await
    }

    async fn resize(&self, pool: &str, name: &str, size: u64, mark: String) -> Result<u64> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.run("resizing a volume", SHORT_DEADLINE, move |r| {
            snapshots::resize(r, &pool, &name, size, &mark)
        })
        .await
    }

    async fn notify(
        &self,
        pool: &str,
        oid: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<NotifyReplies> {
        let (pool, oid) = (pool.to_string(), oid.to_string());
        let op = format!("notifying the watchers of {pool}/{oid}");
        let ctx = op.clone();
        self.run(&op, timeout + Duration::from_secs(10), move |r| {
            r.notify(&pool, &oid, &payload, timeout)
                .map_err(|e| super::ceph_err(ctx, e))
        })
        .await
    }
}

/// [`ClusterOps`] that remembers the last description of every volume that anyone
/// (Get, Create, Mount) read through it. The controller answers Get from it while the
/// cluster cannot be reached: Docker reads any Get error as "no such volume" and would
/// forget the volume, so a volume seen once must stay answerable.
pub struct Remembering {
    inner: std::sync::Arc<dyn ClusterOps>,
    seen: std::sync::Mutex<std::collections::HashMap<String, ImageFacts>>,
}

impl Remembering {
    pub fn new(inner: std::sync::Arc<dyn ClusterOps>) -> Remembering {
        Remembering {
            inner,
            seen: Default::default(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ImageFacts>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last description of `name` read through this, if any.
    pub fn last_seen(&self, name: &str) -> Option<ImageFacts> {
        self.seen().get(name).cloned()
    }
}

#[async_trait]
impl ClusterOps for Remembering {
    async fn describe(&self, pools: Vec<String>, name: &str) -> Result<Option<ImageFacts>> {
        let found = self.inner.describe(pools, name).await?;
        match &found {
            Some(f) => self.seen().insert(name.to_string(), f.clone()),
            None => self.seen().remove(name),
        };
        Ok(found)
    }

    async fn list(&self, pools: Vec<String>, hint: usize) -> Result<Vec<String>> {
        self.inner.list(pools, hint).await
    }

    async fn create(
        &self,
        pool: &str,
        name: &str,
        spec: CreateSpec,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        self.inner.create(pool, name, spec, meta).await
    }

    async fn remove(&self, pools: Vec<String>, name: &str, how: Disposal) -> Result<()> {
        self.inner.remove(pools, name, how).await?;
        self.seen().remove(name);
        Ok(())
    }

    async fn set_meta(&self, pool: &str, name: &str, changes: MetaChanges) -> Result<()> {
        self.inner.set_meta(pool, name, changes).await
    }

    async fn has_data(&self, pool: &str, name: &str) -> Result<bool> {
        self.inner.has_data(pool, name).await
    }

    async fn unblocklist(&self, addr: &str) -> Result<()> {
        self.inner.unblocklist(addr).await
    }

    async fn messenger(&self) -> Result<Messenger> {
        self.inner.messenger().await
    }

    async fn is_blocklisted(&self, addr: &str) -> Result<bool> {
        self.inner.is_blocklisted(addr).await
    }

    async fn snapshots(&self, pool: &str, name: &str) -> Result<Vec<Snapshot>> {
        self.inner.snapshots(pool, name).await
    }

    async fn snap_create(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        self.inner.snap_create(pool, name, snap).await
    }

    async fn snap_remove(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        self.inner.snap_remove(pool, name, snap).await
    }

    async fn rollback(&self, pool: &str, name: &str, snap: &str) -> Result<()> {
        self.inner.rollback(pool, name, snap).await
    }

    async fn clone_volume(
        &self,
        src: CloneSource,
        pool: &str,
        name: &str,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        self.inner.clone_volume(src, pool, name, meta).await
    }

    async fn resize(&self, pool: &str, name: &str, size: u64, mark: String) -> Result<u64> {
        self.inner.resize(pool, name, size, mark).await
    }

    async fn notify(
        &self,
        pool: &str,
        oid: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<NotifyReplies> {
        self.inner.notify(pool, oid, payload, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monmap_says_which_messengers_the_monitors_speak() {
        let v2only = r#"{"epoch":1,"mons":[{"rank":0,"name":"a","public_addrs":{"addrvec":[{"type":"v2","addr":"192.168.150.1:40000","nonce":0}]}}]}"#;
        assert_eq!(mon_kinds(v2only).unwrap(), (false, true));
        let both = r#"{"mons":[{"public_addrs":{"addrvec":[{"type":"v2","addr":"10.0.0.1:3300","nonce":0},{"type":"v1","addr":"10.0.0.1:6789","nonce":0}]}}]}"#;
        assert_eq!(mon_kinds(both).unwrap(), (true, true));
        assert!(mon_kinds("not json").is_err());
    }
}

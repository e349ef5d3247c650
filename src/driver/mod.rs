//! The volume lifecycle Docker drives: Create, Get, List, Remove, Path, Mount, Unmount.
//! The cluster is the source of truth for which volumes exist; this layer validates
//! input, applies defaults and policy, and keeps a small cache so Get can still answer
//! for known volumes while the cluster is unreachable.

pub mod names;
pub mod options;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use crate::ceph::images::{self, Created, Disposal, ImageFacts};
use crate::ceph::Cluster;
use crate::config::{RemovePolicy, Settings};
use crate::error::{Error, Result};
use crate::units::format_size;
use options::{features_to_names, VolumeOptions};

/// Docker gives Create and Mount 2 minutes, everything else 1 minute; stay inside.
pub const LONG_DEADLINE: Duration = Duration::from_secs(100);
pub const SHORT_DEADLINE: Duration = Duration::from_secs(45);

/// What Get answers for one volume.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub name: String,
    pub mountpoint: Option<PathBuf>,
    pub created_at: Option<String>,
    pub status: Map<String, Value>,
}

pub struct Driver {
    settings: Arc<Settings>,
    cluster: Arc<Cluster>,
    host_id: String,
    /// Last facts seen per volume: answers Get while the cluster is unreachable.
    known: Mutex<HashMap<String, ImageFacts>>,
    /// Serialises Create/Remove of one name on this host.
    name_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Size of the last listing, so the next one allocates once.
    list_hint: AtomicUsize,
}

impl Driver {
    pub fn new(settings: Arc<Settings>, cluster: Arc<Cluster>) -> Driver {
        let host_id = settings.effective_host_id();
        Driver {
            settings,
            cluster,
            host_id,
            known: Mutex::new(HashMap::new()),
            name_locks: Mutex::new(HashMap::new()),
            list_hint: AtomicUsize::new(1024),
        }
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.name_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    fn remember(&self, facts: &ImageFacts) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.insert(facts.name.clone(), facts.clone());
    }

    fn forget(&self, name: &str) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.remove(name);
    }

    fn remembered(&self, name: &str) -> Option<ImageFacts> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.get(name).cloned()
    }

    /// Pools to search for `name`: where it was last seen first, then all.
    fn search_order(&self, name: &str) -> Vec<String> {
        let mut pools = self.settings.ceph.pools.clone();
        if let Some(f) = self.remembered(name) {
            if let Some(i) = pools.iter().position(|p| *p == f.pool) {
                let p = pools.remove(i);
                pools.insert(0, p);
            }
        }
        pools
    }

    async fn lookup(&self, name: &str) -> Result<Option<ImageFacts>> {
        let pools = self.search_order(name);
        let n = name.to_string();
        self.cluster
            .run("reading volume", SHORT_DEADLINE, move |r| {
                for pool in &pools {
                    if let Some(f) = images::describe(r, pool, &n)? {
                        return Ok(Some(f));
                    }
                }
                Ok(None)
            })
            .await
    }

    pub async fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<()> {
        names::validate(name)?;
        let wanted = VolumeOptions::parse(opts, &self.settings.volume, &self.settings.ceph.pools)?;
        let lock = self.name_lock(name);
        let _serialised = lock.lock().await;

        if let Some(existing) = self.lookup(name).await? {
            return self.accept_existing(name, &wanted, existing);
        }
        let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let meta = wanted.to_meta(&self.host_id, &created_at);
        let (pool, n, spec) = (wanted.pool.clone(), name.to_string(), wanted.create_spec());
        let outcome = self
            .cluster
            .run("creating volume", LONG_DEADLINE, move |r| {
                images::create(r, &pool, &n, &spec, &meta)
            })
            .await;
        match outcome {
            Ok(Created::New) => {
                tracing::info!(
                    volume = name,
                    pool = %wanted.pool,
                    size = %format_size(wanted.size),
                    fstype = %wanted.fstype,
                    "created volume"
                );
                Ok(())
            }
            // Another host created it between our lookup and create: compare with theirs.
            Ok(Created::AlreadyExists) => match self.lookup(name).await? {
                Some(existing) => self.accept_existing(name, &wanted, existing),
                None => Err(Error::Conflict {
                    name: name.to_string(),
                    existing: "a concurrent create or remove".into(),
                    requested: "a new volume".into(),
                }),
            },
            Err(Error::Ceph { errno, .. })
                if errno == libc::ENOENT && wanted.data_pool.is_some() =>
            {
                Err(Error::InvalidOption {
                    key: "data-pool".into(),
                    value: wanted.data_pool.clone().unwrap_or_default(),
                    reason: "no such pool in the cluster".into(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Create of an existing name succeeds when every explicitly requested setting
    /// matches; otherwise it says what differs.
    fn accept_existing(
        &self,
        name: &str,
        wanted: &VolumeOptions,
        existing: ImageFacts,
    ) -> Result<()> {
        self.remember(&existing);
        let diffs = wanted.mismatches(&existing);
        if diffs.is_empty() {
            tracing::info!(
                volume = name,
                "create: volume exists with compatible settings"
            );
            return Ok(());
        }
        let fmt = |pick: fn(&(String, String, String)) -> String| {
            diffs.iter().map(pick).collect::<Vec<_>>().join(", ")
        };
        Err(Error::Conflict {
            name: name.to_string(),
            existing: fmt(|(k, e, _)| format!("{k}={e}")),
            requested: fmt(|(k, _, r)| format!("{k}={r}")),
        })
    }

    pub async fn get(&self, name: &str) -> Result<VolumeView> {
        names::validate(name)?;
        match self.lookup(name).await {
            Ok(Some(facts)) => {
                self.remember(&facts);
                Ok(self.view(&facts, None))
            }
            Ok(None) => {
                self.forget(name);
                Err(Error::NotFound(name.to_string()))
            }
            Err(e) if e.is_unreachable() => match self.remembered(name) {
                Some(facts) => {
                    tracing::warn!(volume = name, error = %e, "answering Get from the last known state");
                    Ok(self.view(&facts, Some(e.to_string())))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn view(&self, f: &ImageFacts, stale: Option<String>) -> VolumeView {
        let meta = |k: &str| f.meta.get(k).cloned().unwrap_or_default();
        let mut status = Map::new();
        let mut put = |k: &str, v: Value| {
            status.insert(k.to_string(), v);
        };
        put("pool", json!(f.pool));
        put("image", json!(format!("{}/{}", f.pool, f.name)));
        put("size", json!(format_size(f.stat.size)));
        put("size_bytes", json!(f.stat.size));
        put("features", json!(features_to_names(f.stat.features)));
        put("object_size", json!(format_size(f.stat.object_size)));
        if let Some(dp) = f.meta.get("data-pool") {
            put("data_pool", json!(dp));
        }
        put("fstype", json!(meta("fstype")));
        put("mkfs_options", json!(meta("mkfs-options")));
        put("mount_options", json!(meta("mount-options")));
        put("read_only", json!(meta("read-only") == "true"));
        put("created_by", json!(meta("created-by")));
        put(
            "formatted",
            json!(if f.meta.contains_key("formatted") {
                "yes"
            } else {
                "no"
            }),
        );
        put(
            "in_use",
            json!(f.holder().unwrap_or_else(|| "no".to_string())),
        );
        if let Some(why) = stale {
            put(
                "note",
                json!(format!(
                    "cluster unreachable, showing the last known state: {why}"
                )),
            );
        }
        VolumeView {
            name: f.name.clone(),
            mountpoint: None,
            created_at: f.meta.get("created-at").cloned().or_else(|| {
                f.stat
                    .created
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            }),
            status,
        }
    }

    /// Every volume in the configured pools: one listing per pool, no per-image calls.
    pub async fn list(&self) -> Result<Vec<(String, Option<PathBuf>)>> {
        let pools = self.settings.ceph.pools.clone();
        let hint = self.list_hint.load(Ordering::Relaxed);
        let names = self
            .cluster
            .run("listing volumes", SHORT_DEADLINE, move |r| {
                let mut all = Vec::with_capacity(hint);
                for pool in &pools {
                    all.extend(images::list(r, pool, hint)?);
                }
                Ok(all)
            })
            .await?;
        self.list_hint.store(names.len() + 64, Ordering::Relaxed);
        Ok(names
            .into_iter()
            .filter(|n| names::validate(n).is_ok())
            .map(|n| (n, None))
            .collect())
    }

    pub async fn remove(&self, name: &str) -> Result<()> {
        names::validate(name)?;
        let lock = self.name_lock(name);
        let _serialised = lock.lock().await;
        let disposal = match self.settings.remove.policy {
            RemovePolicy::Keep => {
                tracing::info!(
                    volume = name,
                    "remove: policy is keep; the image stays in the cluster"
                );
                return Ok(());
            }
            RemovePolicy::Trash => Disposal::Trash(self.settings.remove.trash_deferment),
            RemovePolicy::Delete => Disposal::Delete,
        };
        let pools = self.search_order(name);
        let n = name.to_string();
        self.cluster
            .run(
                "removing volume",
                SHORT_DEADLINE,
                move |r| match images::find_pool(r, &pools, &n)? {
                    Some(pool) => images::remove(r, &pool, &n, disposal),
                    None => Ok(()),
                },
            )
            .await?;
        self.forget(name);
        tracing::info!(volume = name, how = ?disposal, "removed volume");
        Ok(())
    }

    pub async fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        names::validate(name)?;
        Ok(None)
    }

    pub async fn mount(&self, name: &str, _id: &str) -> Result<PathBuf> {
        names::validate(name)?;
        Err(Error::NotSupported(format!(
            "volume {name} cannot be mounted: mapping RBD images is not available in this build of rbdvol yet; the volume itself is intact"
        )))
    }

    pub async fn unmount(&self, name: &str, _id: &str) -> Result<()> {
        names::validate(name)?;
        // Nothing is ever mounted by this build, so every ID is unknown: success.
        Ok(())
    }
}

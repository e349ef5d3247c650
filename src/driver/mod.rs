//! The volume lifecycle Docker drives: Create, Get, List, Remove, Path, Mount, Unmount.
//! The cluster is the source of truth for which volumes exist; this layer validates
//! input, applies defaults and policy, and keeps a small cache so Get can still answer
//! for known volumes while the cluster is unreachable.

pub mod attach;
pub mod fsopts;
mod mounts;
pub mod names;
pub mod options;
mod orphans;
mod reconcile;
pub mod refs;

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
use crate::host::exporter_proc::Exporters;
use crate::host::mapper::{self, MapperKind};
use crate::units::format_size;
use attach::{Attacher, Mappers};
use options::{features_to_names, VolumeOptions};
use refs::{ActiveVolume, RefTable};

/// dockerd's pid file: identifies the dockerd instance behind each mount ID.
const DOCKERD_PID_FILE: &str = "/var/run/docker.pid";

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
    attacher: Attacher,
    /// Volumes mounted on this host. Never held across an await.
    table: Mutex<RefTable>,
    /// Whether every process (so every container's mounts) is visible here: orphaned
    /// references are released only when it is.
    sees_all_processes: bool,
}

impl Driver {
    pub fn new(settings: Arc<Settings>, cluster: Arc<Cluster>) -> Result<Driver> {
        let host_id = settings.effective_host_id();
        let chosen = match settings.map.mapper.as_str() {
            "krbd" => MapperKind::Krbd,
            "nbd" => MapperKind::Nbd,
            "userspace" => MapperKind::Userspace,
            _ => {
                let (kind, why) = mapper::detect();
                tracing::info!(mapper = kind.name(), reason = %why, "mapper chosen automatically");
                kind
            }
        };
        let exe =
            std::env::current_exe().map_err(|e| Error::io("locating the rbdvol binary", e))?;
        let exporters = Exporters {
            exe,
            ceph: settings.ceph.clone(),
            dir: settings.state_dir.join("exports"),
            fence_expiry: settings.lock.fence_expiry,
        };
        let table = RefTable::load(&settings.state_dir.join("refs.json"))?;
        let attacher = Attacher {
            mappers: Mappers::new(chosen, settings.ceph.clone(), exporters),
            cluster: cluster.clone(),
            mount_root: settings.mount_root.clone(),
            host_id: host_id.clone(),
            takeover_wait: settings.lock.takeover_wait,
            pools: settings.ceph.pools.clone(),
            intents: reconcile::Intents {
                dir: settings.state_dir.join("intents"),
            },
        };
        let sees_all_processes = orphans::sees_all_processes();
        if !sees_all_processes {
            tracing::warn!("this daemon runs in a PID namespace of its own and cannot see containers' mounts: volumes whose references Docker never releases (a lost Mount answer, a dockerd crash) stay held until the daemon restarts in the host's PID namespace (set \"pidhost\": true for a managed plugin)");
        }
        Ok(Driver {
            settings,
            cluster,
            host_id,
            known: Mutex::new(HashMap::new()),
            name_locks: Mutex::new(HashMap::new()),
            list_hint: AtomicUsize::new(1024),
            attacher,
            table: Mutex::new(table),
            sees_all_processes,
        })
    }

    pub fn mapper(&self) -> MapperKind {
        self.attacher.mappers.chosen
    }

    /// Reconciles the reference table with what this host really has mounted and
    /// mapped. Run once at start, before serving.
    pub async fn reconcile(&self) {
        let mut table = {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let empty = t.empty_like();
            std::mem::replace(&mut *t, empty)
        };
        self.attacher.reconcile(&mut table).await;
        *self.table.lock().unwrap_or_else(|e| e.into_inner()) = table;
    }

    fn active(&self, name: &str) -> Option<ActiveVolume> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.volumes.get(name).cloned()
    }

    /// Applies `f` to the table and saves it; if the save fails, nothing changes.
    fn update_table<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, ActiveVolume>) -> T,
    ) -> Result<T> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.apply(f)
    }

    fn volume_names(&self) -> Vec<String> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.volumes.keys().cloned().collect()
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
                images::describe_in(r, &pools, &n)
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
        self.check_fencing(Some(name)).await;
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
        put("allow_suid_dev", json!(meta("allow-suid-dev") == "true"));
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
        let active = self.active(&f.name);
        if let Some(a) = &active {
            status.insert(
                "mounted_here".into(),
                json!({
                    "mountpoint": a.mountpoint,
                    "device": a.mapping.device,
                    "mapper": a.mapping.kind.name(),
                    "container_mounts": a.total_refs(),
                    "since": a.since,
                    "fenced": a.fenced,
                }),
            );
        }
        VolumeView {
            name: f.name.clone(),
            mountpoint: active.map(|a| a.mountpoint),
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
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        Ok(names
            .into_iter()
            .filter(|n| names::validate(n).is_ok())
            .map(|n| {
                let mp = t.volumes.get(&n).map(|a| a.mountpoint.clone());
                (n, mp)
            })
            .collect())
    }

    pub async fn remove(&self, name: &str) -> Result<()> {
        names::validate(name)?;
        let lock = self.name_lock(name);
        let _serialised = lock.lock().await;
        if let Some(a) = self.active(name) {
            return Err(Error::InUse {
                name: name.to_string(),
                holder: format!(
                    "mounted on this host ({}) by {} container mount(s); stop those containers first",
                    self.host_id,
                    a.total_refs()
                ),
            });
        }
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
            .run("removing volume", SHORT_DEADLINE, move |r| {
                images::remove(r, &pools, &n, disposal)
            })
            .await?;
        self.forget(name);
        tracing::info!(volume = name, how = ?disposal, "removed volume");
        Ok(())
    }

    pub async fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        names::validate(name)?;
        Ok(self.active(name).map(|a| a.mountpoint))
    }
}

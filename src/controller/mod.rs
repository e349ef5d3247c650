//! The controller half: the cluster-side lifecycle of volumes, the same from every host.
//! Create (validated options, stored on the image for every host to read), Get (from the
//! last description seen while the cluster is unreachable, see [`Remembering`]), List
//! and Remove (by policy: trash, delete or keep). Snapshots, clones
//! and resize belong here too. Results are typed; a front end (Docker's protocol in
//! `api`, later CSI) turns them into its own shapes.

mod daytwo;
#[cfg(test)]
mod daytwo_tests;
#[cfg(test)]
mod tests;

pub use daytwo::{parse_snapshot_ref, FsGrow, Lineage, Resized, Snapped, SnapshotRow};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::ceph::images::{Created, Disposal, ImageFacts};
use crate::ceph::ops::Remembering;
use crate::ceph::ClusterOps;
use crate::config::{RemovePolicy, RemoveSettings, VolumeDefaults};
use crate::error::{Error, Result};
use crate::units::format_size;
use crate::volume::options::VolumeOptions;
use crate::volume::{key, names, NameLocks, VolumeRecord};

/// What the controller needs to know: the pools it serves and the policies.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This host's id, recorded as a volume's creator.
    pub host_id: String,
    pub pools: Vec<String>,
    pub defaults: VolumeDefaults,
    pub remove: RemoveSettings,
}

/// One volume, as Get describes it.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub size: u64,
    pub features: u64,
    pub object_size: u64,
    pub record: VolumeRecord,
    /// Who holds it (lock owner, advisory locks, watchers), in words.
    pub holder: Option<String>,
    pub created_at: Option<String>,
    /// Set when the cluster could not be reached: why, and that this is the last state seen.
    pub stale: Option<String>,
    pub snapshots: Vec<crate::ceph::sys::SnapInfo>,
}

pub struct Controller {
    cfg: ControllerConfig,
    /// Shared with the node, so a volume mounted here is answerable too.
    cluster: Arc<Remembering>,
    /// Serialises Create/Remove of one name on this host.
    locks: NameLocks,
    /// Size of the last listing, so the next one allocates once.
    list_hint: AtomicUsize,
}

impl Controller {
    pub fn new(cfg: ControllerConfig, cluster: Arc<Remembering>) -> Controller {
        Controller {
            cfg,
            cluster,
            locks: NameLocks::default(),
            list_hint: AtomicUsize::new(1024),
        }
    }

    /// The same controller on another connection (a user's own credentials).
    pub fn with_cluster(&self, cluster: Arc<Remembering>) -> Controller {
        Controller::new(self.cfg.clone(), cluster)
    }

    /// Pools to search for `name`: where it was last seen first, then all.
    fn search_order(&self, name: &str) -> Vec<String> {
        let mut pools = self.cfg.pools.clone();
        if let Some(f) = self.cluster.last_seen(name) {
            if let Some(i) = pools.iter().position(|p| *p == f.pool) {
                let p = pools.remove(i);
                pools.insert(0, p);
            }
        }
        pools
    }

    async fn lookup(&self, name: &str) -> Result<Option<ImageFacts>> {
        self.cluster.describe(self.search_order(name), name).await
    }

    pub async fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<()> {
        names::validate(name)?;
        if opts.contains_key(daytwo::FROM) {
            return self.create_from(name, opts).await;
        }
        let wanted = VolumeOptions::parse(opts, &self.cfg.defaults, &self.cfg.pools)?;
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;

        if let Some(existing) = self.lookup(name).await? {
            return self.accept_existing(name, &wanted, existing);
        }
        let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let meta = wanted.to_meta(&self.cfg.host_id, &created_at);
        let outcome = self
            .cluster
            .create(&wanted.pool, name, wanted.create_spec(), meta)
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
                    key: key::DATA_POOL.into(),
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

    /// The volume as the cluster describes it; while the cluster cannot be reached,
    /// as it was last seen (Docker reads a Get error as "no such volume" and purges it).
    pub async fn get(&self, name: &str) -> Result<VolumeInfo> {
        names::validate(name)?;
        match self.lookup(name).await {
            Ok(Some(facts)) => Ok(self.info(&facts, None)),
            Ok(None) => Err(Error::NotFound(name.to_string())),
            Err(e) if e.is_unreachable() => match self.cluster.last_seen(name) {
                Some(facts) => {
                    tracing::warn!(volume = name, error = %e, "answering Get from the last known state");
                    Ok(self.info(&facts, Some(e.to_string())))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn info(&self, f: &ImageFacts, stale: Option<String>) -> VolumeInfo {
        let record = VolumeRecord::from_meta(&f.meta);
        VolumeInfo {
            name: f.name.clone(),
            pool: f.pool.clone(),
            size: f.stat.size,
            features: f.stat.features,
            object_size: f.stat.object_size,
            holder: f.holder(),
            created_at: record.created_at.clone().or_else(|| {
                f.stat
                    .created
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            }),
            record,
            stale,
            snapshots: f.snapshots.clone(),
        }
    }

    /// Every volume in the configured pools: one listing per pool, no per-image calls.
    pub async fn list(&self) -> Result<Vec<String>> {
        let hint = self.list_hint.load(Ordering::Relaxed);
        let names = self.cluster.list(self.cfg.pools.clone(), hint).await?;
        self.list_hint.store(names.len() + 64, Ordering::Relaxed);
        Ok(names
            .into_iter()
            .filter(|n| names::validate(n).is_ok())
            .collect())
    }

    /// Removes the volume by the configured policy. The cluster refuses while any
    /// client holds or watches the image; whether it is mounted on this host is the
    /// node's to say (see [`crate::node::Node::while_unmounted`]).
    pub async fn remove(&self, name: &str) -> Result<()> {
        names::validate(name)?;
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;
        let disposal = match self.cfg.remove.policy {
            RemovePolicy::Keep => {
                tracing::info!(
                    volume = name,
                    "remove: policy is keep; the image stays in the cluster"
                );
                return Ok(());
            }
            RemovePolicy::Trash => Disposal::Trash(self.cfg.remove.trash_deferment),
            RemovePolicy::Delete => Disposal::Delete,
        };
        self.cluster
            .remove(self.search_order(name), name, disposal)
            .await?;
        tracing::info!(volume = name, how = ?disposal, "removed volume");
        Ok(())
    }
}

//! The node half: what happens on this host. Attaching a volume (map, format only if
//! provably blank, mount) and detaching it, counting Docker's references per mount ID,
//! noticing that this host was fenced, releasing references Docker will never
//! release, and reconciling what a crash left behind. Every effect goes through the
//! [`ClusterOps`], [`HostOps`] and [`Mapper`](crate::host::mapper::Mapper) traits
//! chosen in `main.rs`, so each decision here is unit-tested with fakes.

pub mod attach;
pub mod control;
mod csi;
mod mounts;
mod orphans;
pub mod reconcile;
pub mod refs;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ceph::ClusterOps;
use crate::error::{Error, Result};
use crate::host::mapper::MapperKind;
use crate::host::ops::HostOps;
use crate::volume::NameLocks;
use attach::{Attacher, Mappers};
use refs::{ActiveVolume, RefTable};

pub use orphans::sees_all_processes;

/// What the node needs to know about this host and its policy.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub host_id: String,
    /// `<mount_root>/<pool>/<name>`: where volumes are mounted (a real path).
    pub mount_root: PathBuf,
    pub pools: Vec<String>,
    /// How long a Mount waits for another host's lock.
    pub takeover_wait: Duration,
    /// See [`orphans`].
    pub orphan_grace: Duration,
    /// Where the reference table, exporter state and map intents live.
    pub state_dir: PathBuf,
    /// dockerd's pid file: identifies the dockerd instance behind each mount ID.
    pub dockerd_pid_file: PathBuf,
    /// Whether every process on the host is visible (orphans are judged only then).
    pub sees_all_processes: bool,
    /// `map.ms_mode` (krbd's messenger mode).
    pub ms_mode: String,
}

/// A volume as mounted on this host, for Get and List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub mountpoint: PathBuf,
    pub device: PathBuf,
    pub mapper: MapperKind,
    pub container_mounts: u32,
    pub since: String,
    pub fenced: bool,
}

pub struct Node {
    cfg: NodeConfig,
    cluster: Arc<dyn ClusterOps>,
    attacher: Attacher,
    /// Volumes mounted on this host. Never held across an await.
    table: Mutex<RefTable>,
    locks: NameLocks,
    /// Serialises CSI stage/publish of one volume (outside `locks`, which Mount takes).
    csi_locks: NameLocks,
}

impl Node {
    /// A node over the given effects, with the reference table found in the state dir.
    pub fn new(
        cfg: NodeConfig,
        cluster: Arc<dyn ClusterOps>,
        host: Arc<dyn HostOps>,
        mappers: Mappers,
    ) -> Result<Node> {
        let table = RefTable::load(&cfg.state_dir.join("refs.json"))?;
        if !cfg.sees_all_processes {
            tracing::warn!("this daemon runs in a PID namespace of its own and cannot see containers' mounts: volumes whose references Docker never releases (a lost Mount answer, a dockerd crash) stay held until the daemon restarts in the host's PID namespace (set \"pidhost\": true for a managed plugin)");
        }
        let attacher = Attacher {
            mappers,
            cluster: cluster.clone(),
            host,
            mount_root: cfg.mount_root.clone(),
            host_id: cfg.host_id.clone(),
            takeover_wait: cfg.takeover_wait,
            pools: cfg.pools.clone(),
            intents: reconcile::Intents {
                dir: cfg.state_dir.join("intents"),
            },
            ms_mode: cfg.ms_mode.clone(),
        };
        Ok(Node {
            cfg,
            cluster,
            attacher,
            table: Mutex::new(table),
            locks: NameLocks::default(),
            csi_locks: NameLocks::default(),
        })
    }

    pub fn mapper(&self) -> MapperKind {
        self.attacher.mappers.chosen
    }

    pub fn host_id(&self) -> &str {
        &self.cfg.host_id
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

    /// The volume as mounted here, if it is.
    pub fn attached(&self, name: &str) -> Option<Attached> {
        self.active(name).map(|a| Attached {
            container_mounts: a.total_refs(),
            mountpoint: a.mountpoint,
            device: a.mapping.device,
            mapper: a.mapping.kind,
            since: a.since,
            fenced: a.fenced,
        })
    }

    /// What is mounted here, for the metrics endpoint.
    pub fn stats(&self) -> crate::metrics::Snapshot {
        let volumes = {
            let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            t.volumes.clone()
        };
        let count = |f: &dyn Fn(&refs::ActiveVolume) -> bool| {
            volumes.values().filter(|v| f(v)).count() as i64
        };
        let io = volumes
            .iter()
            .filter_map(|(name, v)| {
                let req = self.attacher.request_for(name, v);
                let stats = self
                    .attacher
                    .mappers
                    .get(v.mapping.kind)
                    .io_stats(&req, &v.mapping)?;
                Some((format!("{}/{name}", v.pool), stats))
            })
            .collect();
        crate::metrics::Snapshot {
            volumes: volumes.len() as i64,
            references: volumes.values().map(|v| i64::from(v.total_refs())).sum(),
            exporters: count(&|v| v.mapping.exporter_pid.is_some()),
            fenced: count(&|v| v.fenced),
            io,
        }
    }

    /// Every volume mounted here, as the holder of snapshot and resize requests needs it.
    pub fn control_targets(&self) -> BTreeMap<String, control::Target> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.volumes
            .iter()
            .filter(|(_, a)| !a.fenced)
            .map(|(n, a)| {
                (
                    n.clone(),
                    control::Target {
                        pool: a.pool.clone(),
                        mountpoint: a.mountpoint.clone(),
                        device: a.mapping.device.clone(),
                        fstype: a.fstype.clone(),
                        read_only: a.read_only,
                    },
                )
            })
            .collect()
    }

    /// Mount points of every volume mounted here, by name.
    pub fn mountpoints(&self) -> BTreeMap<String, PathBuf> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.volumes
            .iter()
            .map(|(n, a)| (n.clone(), a.mountpoint.clone()))
            .collect()
    }

    /// Runs `f` (a Remove) under the volume's lock, only while it is not mounted here:
    /// a Mount of the same volume cannot start in between.
    pub async fn while_unmounted<T>(
        &self,
        name: &str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let lock = self.locks.get(name);
        let _serialised = lock.lock().await;
        if let Some(a) = self.active(name) {
            return Err(Error::InUse {
                name: name.to_string(),
                holder: format!(
                    "mounted on this host ({}) by {} container mount(s); stop those containers first",
                    self.cfg.host_id,
                    a.total_refs()
                ),
            });
        }
        f.await
    }
}

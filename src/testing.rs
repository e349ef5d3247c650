//! Test doubles for the effect traits: a cluster, a host and mappers that live in
//! memory, record what was asked of them, and fail on demand. They let the controller's
//! and the node's decisions (references, rollback at every step of Mount, fencing,
//! orphans, reconcile) be tested in plain `cargo test`, without root or a cluster. The
//! real implementations are tested against the real cluster in `tests/`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::ceph::images::{Created, Disposal, ImageFacts};
use crate::ceph::ops::MetaChanges;
use crate::ceph::sys::{CreateSpec, ImageStat, Locker};
use crate::ceph::ClusterOps;
use crate::error::{Error, Result};
use crate::host::fs::{Content, MountEntry, Probe};
use crate::host::mapper::{Health, KernelMapping, MapRequest, Mapper, MapperKind, Mapping};
use crate::host::ops::HostOps;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Facts of an image with `meta` (keys without the `rbdvol.` prefix).
pub fn facts(pool: &str, name: &str, meta: &[(&str, &str)]) -> ImageFacts {
    ImageFacts {
        pool: pool.into(),
        name: name.into(),
        stat: ImageStat {
            size: 1 << 30,
            object_size: 4 << 20,
            features: 1 | 4,
            data_pool_id: None,
            created: None,
        },
        meta: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        lock_owners: Vec::new(),
        watchers: Vec::new(),
        advisory_locks: Vec::new(),
        snapshots: Vec::new(),
    }
}

/// A volume as rbdvol's Create leaves it: never mapped, known to be zeros.
pub fn fresh(pool: &str, name: &str) -> ImageFacts {
    facts(
        pool,
        name,
        &[
            ("fstype", "ext4"),
            ("created-by", "host-a"),
            ("created-at", "2026-12-01T00:00:00Z"),
        ],
    )
}

#[derive(Default)]
pub struct ClusterState {
    pub images: BTreeMap<String, ImageFacts>,
    /// Every call fails as if the monitors could not be reached.
    pub unreachable: bool,
    pub fail_set_meta: bool,
    /// Images a kernel client (krbd) holds the exclusive lock of: it refuses every
    /// other client's write, metadata included.
    pub kernel_locked: BTreeSet<String>,
    /// Client addresses on the OSD blocklist.
    pub blocklist: BTreeSet<String>,
    /// What `messenger` answers (default: msgr2-only monitors, Ceph's default modes).
    pub messenger: Option<crate::ceph::ops::Messenger>,
    /// Images whose allocation map shows data.
    pub allocated: BTreeSet<String>,
    /// Create finds the name taken by a concurrent Create (another host) with these facts.
    pub created_meanwhile: Option<ImageFacts>,
    pub removed: Vec<(String, String)>,
    pub unblocklisted: Vec<String>,
    pub creates: usize,
}

#[derive(Default)]
pub struct FakeCluster {
    pub state: Mutex<ClusterState>,
}

impl FakeCluster {
    pub fn with(images: Vec<ImageFacts>) -> FakeCluster {
        let c = FakeCluster::default();
        for f in images {
            lock(&c.state).images.insert(f.name.clone(), f);
        }
        c
    }

    pub fn set(&self, f: impl FnOnce(&mut ClusterState)) {
        f(&mut lock(&self.state))
    }

    pub fn meta(&self, name: &str, key: &str) -> Option<String> {
        lock(&self.state).images.get(name)?.meta.get(key).cloned()
    }

    pub fn image(&self, name: &str) -> Option<ImageFacts> {
        lock(&self.state).images.get(name).cloned()
    }

    fn reachable(&self) -> Result<()> {
        if lock(&self.state).unreachable {
            return Err(Error::Unavailable("monitors down (fake)".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ClusterOps for FakeCluster {
    async fn describe(&self, pools: Vec<String>, name: &str) -> Result<Option<ImageFacts>> {
        self.reachable()?;
        let s = lock(&self.state);
        Ok(s.images
            .get(name)
            .filter(|f| pools.contains(&f.pool))
            .cloned())
    }

    async fn list(&self, pools: Vec<String>, _hint: usize) -> Result<Vec<String>> {
        self.reachable()?;
        let s = lock(&self.state);
        Ok(s.images
            .values()
            .filter(|f| pools.contains(&f.pool))
            .map(|f| f.name.clone())
            .collect())
    }

    async fn create(
        &self,
        pool: &str,
        name: &str,
        spec: CreateSpec,
        meta: Vec<(String, String)>,
    ) -> Result<Created> {
        self.reachable()?;
        let mut s = lock(&self.state);
        s.creates += 1;
        if let Some(theirs) = s.created_meanwhile.take() {
            s.images.insert(name.into(), theirs);
            return Ok(Created::AlreadyExists);
        }
        if s.images.contains_key(name) {
            return Ok(Created::AlreadyExists);
        }
        let mut f = facts(pool, name, &[]);
        f.stat.size = spec.size;
        f.stat.features = spec.features;
        f.meta = meta.into_iter().collect();
        s.images.insert(name.into(), f);
        Ok(Created::New)
    }

    async fn remove(&self, pools: Vec<String>, name: &str, how: Disposal) -> Result<()> {
        self.reachable()?;
        let mut s = lock(&self.state);
        let Some(f) = s.images.get(name).filter(|f| pools.contains(&f.pool)) else {
            return Ok(());
        };
        if let Some(holder) = f.holder() {
            return Err(Error::InUse {
                name: name.into(),
                holder,
            });
        }
        s.images.remove(name);
        s.removed.push((name.into(), format!("{how:?}")));
        Ok(())
    }

    async fn set_meta(&self, _pool: &str, name: &str, changes: MetaChanges) -> Result<()> {
        self.reachable()?;
        let mut s = lock(&self.state);
        if s.fail_set_meta || s.kernel_locked.contains(name) {
            return Err(Error::Ceph {
                op: format!("writing metadata of {name}"),
                errno: libc::EROFS,
                detail: "Read-only file system (fake)".into(),
            });
        }
        let f = s
            .images
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(name.into()))?;
        for (k, v) in changes {
            match v {
                Some(v) => f.meta.insert(k.to_string(), v),
                None => f.meta.remove(k),
            };
        }
        Ok(())
    }

    async fn is_blocklisted(&self, addr: &str) -> Result<bool> {
        self.reachable()?;
        Ok(lock(&self.state).blocklist.contains(addr))
    }

    async fn messenger(&self) -> Result<crate::ceph::ops::Messenger> {
        self.reachable()?;
        Ok(lock(&self.state)
            .messenger
            .clone()
            .unwrap_or_else(|| crate::ceph::ops::Messenger {
                mon_v1: false,
                mon_v2: true,
                client_mode: "crc secure".into(),
                other_modes: vec![
                    "secure crc".into(),
                    "crc secure".into(),
                    "secure crc".into(),
                ],
            }))
    }

    async fn has_data(&self, _pool: &str, name: &str) -> Result<bool> {
        self.reachable()?;
        Ok(lock(&self.state).allocated.contains(name))
    }

    async fn unblocklist(&self, addr: &str) -> Result<()> {
        lock(&self.state).unblocklisted.push(addr.into());
        Ok(())
    }
}

/// A lock owner, for facts of an image held by another host.
pub fn held_by(f: &mut ImageFacts, host: &str, addr: &str) {
    f.lock_owners.push(Locker {
        client: "client.4721".into(),
        cookie: "auto 1".into(),
        addr: addr.into(),
    });
    f.meta.insert("owner.host".into(), host.into());
    f.meta.insert("owner.addr".into(), addr.into());
}

#[derive(Default)]
pub struct HostState {
    /// The daemon's mount table.
    pub mounts: Vec<MountEntry>,
    /// What the probe finds per device (default: nothing).
    pub probes: HashMap<PathBuf, Probe>,
    /// What a read of each device finds (default: zeros).
    pub content: HashMap<PathBuf, Content>,
    /// Devices formatted so far, with their filesystem.
    pub formatted: HashMap<PathBuf, String>,
    /// Steps that fail: "probe", "mkfs", "preen", "mount", "umount", "grow".
    pub fail: HashSet<&'static str>,
    /// Mount points whose unmount is refused as busy.
    pub busy: HashSet<PathBuf>,
    /// Uses of the filesystem mounted at a mount point (containers holding it).
    pub uses: HashMap<PathBuf, Vec<String>>,
    pub device_users: HashMap<PathBuf, Vec<String>>,
    /// (fstype, fresh, device) of every mkfs.
    pub mkfs: Vec<(String, bool, PathBuf)>,
    /// (target, options) of every mount.
    pub mounted: Vec<(PathBuf, String)>,
}

#[derive(Default)]
pub struct FakeHost {
    pub state: Mutex<HostState>,
}

impl FakeHost {
    pub fn set(&self, f: impl FnOnce(&mut HostState)) {
        f(&mut lock(&self.state))
    }

    pub fn is_mounted(&self, target: &Path) -> bool {
        lock(&self.state).mounts.iter().any(|m| m.target == target)
    }

    fn failing(&self, step: &'static str) -> Result<()> {
        if lock(&self.state).fail.contains(step) {
            return Err(Error::Command {
                program: step.into(),
                detail: format!("{step} failed (fake)"),
            });
        }
        Ok(())
    }
}

/// A mount table entry as the kernel would show it.
pub fn entry(device: &Path, target: &Path, fstype: &str) -> MountEntry {
    let n: String = device
        .to_string_lossy()
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    MountEntry {
        target: target.into(),
        fstype: fstype.into(),
        source: device.display().to_string(),
        dev: format!("7:{n}"),
        shared: None,
        master: None,
    }
}

#[async_trait]
impl HostOps for FakeHost {
    async fn probe(&self, device: &Path) -> Result<Probe> {
        self.failing("probe")?;
        let s = lock(&self.state);
        if let Some(t) = s.formatted.get(device) {
            return Ok(Probe::Signature(t.clone()));
        }
        Ok(s.probes.get(device).cloned().unwrap_or(Probe::Blank))
    }

    async fn sample(&self, device: &Path) -> Content {
        let s = lock(&self.state);
        s.content.get(device).cloned().unwrap_or(Content::Zeros)
    }

    async fn mkfs(&self, fstype: &str, _options: &str, fresh: bool, device: &Path) -> Result<()> {
        self.failing("mkfs")?;
        let mut s = lock(&self.state);
        s.mkfs.push((fstype.into(), fresh, device.into()));
        s.formatted.insert(device.into(), fstype.into());
        Ok(())
    }

    async fn preen(&self, _fstype: &str, _device: &Path) -> Result<()> {
        self.failing("preen")
    }

    async fn grow_fs(&self, _fstype: &str, _device: &Path, _mountpoint: &Path) -> Result<()> {
        self.failing("grow")
    }

    async fn mount(&self, device: &Path, target: &Path, fstype: &str, options: &str) -> Result<()> {
        self.failing("mount")?;
        let mut s = lock(&self.state);
        s.mounts.push(entry(device, target, fstype));
        s.mounted.push((target.into(), options.into()));
        Ok(())
    }

    async fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        self.failing("mount")?;
        let mut s = lock(&self.state);
        s.mounts.push(entry(source, target, "bind"));
        s.mounted.push((
            target.into(),
            if read_only { "bind,ro" } else { "bind" }.into(),
        ));
        Ok(())
    }

    async fn umount(&self, target: &Path) -> Result<()> {
        self.failing("umount")?;
        let mut s = lock(&self.state);
        if s.busy.contains(target) {
            return Err(Error::InUse {
                name: target.display().to_string(),
                holder: "busy (fake)".into(),
            });
        }
        s.mounts.retain(|m| m.target != target);
        Ok(())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        Ok(lock(&self.state).mounts.clone())
    }

    fn uses(&self, own: &MountEntry) -> Vec<String> {
        lock(&self.state)
            .uses
            .get(&own.target)
            .cloned()
            .unwrap_or_default()
    }

    fn device_users(&self, device: &Path, _mountpoint: &Path) -> Vec<String> {
        lock(&self.state)
            .device_users
            .get(device)
            .cloned()
            .unwrap_or_default()
    }

    fn create_dir(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    fn create_leaf_dir(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    fn remove_dir(&self, _dir: &Path) {}
}

#[derive(Default)]
pub struct MapperState {
    /// "pool/image" -> device.
    pub mapped: BTreeMap<String, PathBuf>,
    /// The device each image was last mapped to: mapped again, it gets the same one
    /// (so what was written to it is found again).
    pub devices: BTreeMap<String, PathBuf>,
    pub next: u32,
    pub fail_map: bool,
    pub fail_unmap: bool,
    /// How long a map takes (a lock wait).
    pub map_delay: Duration,
    /// A krbd fake's writable mappings hold this cluster's image locks the way the
    /// kernel client does (see [`ClusterState::kernel_locked`]).
    pub locks_in: Option<Arc<FakeCluster>>,
    /// Every map gets a new device (what was written to the last one is not there).
    pub new_device_each_map: bool,
    /// What `client_addr` answers.
    pub client_addr: Option<String>,
    /// The `ms_mode` of every map request.
    pub ms_modes: Vec<Option<String>>,
    /// Health to report instead of "mapped or not".
    pub health: HashMap<String, Health>,
    pub unrecorded: Vec<(String, String)>,
    pub kernel: Vec<KernelMapping>,
    pub fenced_client: Option<String>,
    pub maps: usize,
    pub unmaps: Vec<PathBuf>,
}

/// A mapper of any kind: devices are `/dev/fakeN`.
pub struct FakeMapper {
    pub kind: MapperKind,
    pub state: Mutex<MapperState>,
}

impl FakeMapper {
    pub fn new(kind: MapperKind) -> FakeMapper {
        FakeMapper {
            kind,
            state: Mutex::new(MapperState::default()),
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut MapperState)) {
        f(&mut lock(&self.state))
    }

    pub fn is_mapped(&self, pool: &str, image: &str) -> bool {
        lock(&self.state)
            .mapped
            .contains_key(&format!("{pool}/{image}"))
    }

    pub fn maps(&self) -> usize {
        lock(&self.state).maps
    }
}

#[async_trait]
impl Mapper for FakeMapper {
    fn kind(&self) -> MapperKind {
        self.kind
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping> {
        let delay = lock(&self.state).map_delay;
        tokio::time::sleep(delay).await;
        let mut s = lock(&self.state);
        s.maps += 1;
        s.ms_modes.push(req.ms_mode.clone());
        if s.fail_map {
            return Err(Error::Command {
                program: "map".into(),
                detail: "map failed (fake)".into(),
            });
        }
        let key = format!("{}/{}", req.pool, req.image);
        let device = match s.devices.get(&key).filter(|_| !s.new_device_each_map) {
            Some(d) => d.clone(),
            None => {
                s.next += 1;
                PathBuf::from(format!("/dev/fake{}", s.next))
            }
        };
        s.devices.insert(key.clone(), device.clone());
        s.mapped.insert(key, device.clone());
        if let Some(c) = s
            .locks_in
            .as_ref()
            .filter(|_| self.kind == MapperKind::Krbd)
        {
            if !req.read_only {
                c.set(|cs| {
                    cs.kernel_locked.insert(req.image.clone());
                });
            }
        }
        Ok(Mapping {
            kind: self.kind,
            device,
            exporter_pid: None,
            backing: None,
        })
    }

    async fn unmap(&self, req: &MapRequest, mapping: &Mapping) -> Result<()> {
        let mut s = lock(&self.state);
        if s.fail_unmap {
            return Err(Error::InUse {
                name: mapping.device.display().to_string(),
                holder: "still in use (fake)".into(),
            });
        }
        s.unmaps.push(mapping.device.clone());
        s.mapped.remove(&format!("{}/{}", req.pool, req.image));
        if let Some(c) = &s.locks_in {
            c.set(|cs| {
                cs.kernel_locked.remove(&req.image);
            });
        }
        Ok(())
    }

    async fn health(&self, req: &MapRequest, _mapping: &Mapping) -> Health {
        let s = lock(&self.state);
        let key = format!("{}/{}", req.pool, req.image);
        if let Some(h) = s.health.get(&key) {
            return h.clone();
        }
        if s.mapped.contains_key(&key) {
            Health::Serving
        } else {
            Health::Gone
        }
    }

    async fn kernel_mappings(&self) -> Result<Vec<KernelMapping>> {
        Ok(lock(&self.state).kernel.clone())
    }

    fn unrecorded(&self) -> Vec<(String, String)> {
        lock(&self.state).unrecorded.clone()
    }

    fn fenced_client(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<String> {
        lock(&self.state).fenced_client.clone()
    }

    fn refuses_peer_writes(&self) -> bool {
        self.kind == MapperKind::Krbd
    }

    fn client_addr(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<String> {
        lock(&self.state).client_addr.clone()
    }
}

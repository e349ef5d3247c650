//! The data path for one volume: map the image, decide whether it may be formatted
//! (only when provably blank), format or check it, mount it under the plugin-owned
//! root; and the reverse. Also reconciling what a crash or restart left behind.
//! A step that fails undoes the steps before it, so nothing is left half-mapped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::refs::{ActiveVolume, RefTable};
use crate::ceph::images::{self, ImageFacts};
use crate::ceph::Cluster;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::host::exporter_proc::Exporters;
use crate::host::fs::{self, Probe};
use crate::host::mapper::{Health, Krbd, MapRequest, Mapper, MapperKind, Mapping, Nbd, Userspace};

/// Filesystems rbdvol mounts when it finds them (it formats only ext4 and xfs).
const MOUNTABLE: &[&str] = &["ext4", "ext3", "ext2", "xfs"];

/// What to do with what the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatDecision {
    Format,
    Mount { fstype: String },
    Refuse(String),
}

/// Formats only a device that shows no signature at all AND has never been formatted
/// by rbdvol (the `rbdvol.formatted` marker). Everything else is mounted as found or
/// refused: nothing the user wrote is ever overwritten.
pub fn decide(
    volume: &str,
    probe: &Probe,
    marker: Option<&str>,
    read_only: bool,
) -> FormatDecision {
    match (probe, marker) {
        (Probe::Blank, None) if read_only => FormatDecision::Refuse(format!(
            "volume {volume} has no filesystem yet and is read-only, so there is nothing to mount; use it writable once to format it"
        )),
        (Probe::Blank, None) => FormatDecision::Format,
        (Probe::Blank, Some(m)) => FormatDecision::Refuse(format!(
            "volume {volume} was formatted before ({m}) but no filesystem is found on it now; rbdvol will not format it again, so nothing is lost. Inspect the image (e.g. `rbd export` it and run blkid/fsck on the copy)"
        )),
        (Probe::Signature(t), _) if MOUNTABLE.contains(&t.as_str()) => {
            FormatDecision::Mount { fstype: t.clone() }
        }
        (other, _) => FormatDecision::Refuse(format!(
            "volume {volume} holds {}, which rbdvol neither mounts nor formats; it was left untouched",
            other.describe()
        )),
    }
}

/// Every mapper, so records made under another mapper can still be released.
pub struct Mappers {
    pub chosen: MapperKind,
    krbd: Arc<Krbd>,
    nbd: Arc<Nbd>,
    userspace: Arc<Userspace>,
}

impl Mappers {
    pub fn new(
        chosen: MapperKind,
        ceph: crate::config::CephSettings,
        exporters: Exporters,
    ) -> Mappers {
        Mappers {
            chosen,
            krbd: Arc::new(Krbd {
                ceph: ceph.clone(),
                sysfs: "/sys/bus/rbd".into(),
            }),
            nbd: Arc::new(Nbd { ceph }),
            userspace: Arc::new(Userspace { exporters }),
        }
    }

    pub fn get(&self, kind: MapperKind) -> Arc<dyn Mapper> {
        match kind {
            MapperKind::Krbd => self.krbd.clone(),
            MapperKind::Nbd => self.nbd.clone(),
            MapperKind::Userspace => self.userspace.clone(),
        }
    }

    pub fn exporters(&self) -> &Exporters {
        &self.userspace.exporters
    }
}

pub struct Attacher {
    pub mappers: Mappers,
    pub cluster: Arc<Cluster>,
    pub mount_root: PathBuf,
    pub host_id: String,
    pub takeover_wait: Duration,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Attacher {
    pub fn mountpoint(&self, pool: &str, name: &str) -> PathBuf {
        self.mount_root.join(pool).join(name)
    }

    fn request(&self, pool: &str, name: &str, read_only: bool, features: u64) -> MapRequest {
        MapRequest {
            pool: pool.to_string(),
            image: name.to_string(),
            read_only,
            features,
            host_id: self.host_id.clone(),
            lock_wait: self.takeover_wait,
        }
    }

    pub fn request_for(&self, name: &str, v: &ActiveVolume) -> MapRequest {
        self.request(&v.pool, name, v.read_only, v.features)
    }

    /// Maps, formats if provably blank, and mounts. On failure everything done so far
    /// is undone and the error says what happened.
    pub async fn attach(&self, facts: &ImageFacts) -> Result<ActiveVolume> {
        let name = facts.name.as_str();
        let meta = |k: &str| facts.meta.get(k).cloned();
        let read_only = meta("read-only").as_deref() == Some("true");
        let req = self.request(&facts.pool, name, read_only, facts.stat.features);
        let mountpoint = self.mountpoint(&facts.pool, name);
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| Error::io(format!("creating {}", mountpoint.display()), e))?;
        if fs::mounted_at(&mountpoint)?.is_some() {
            // A leftover the reconcile could not release: never stack a second mount.
            fs::umount(&mountpoint).await?;
        }
        let mapper = self.mappers.get(self.mappers.chosen);
        let mapping = mapper.map(&req).await?;
        tracing::info!(volume = name, device = %mapping.device.display(), mapper = mapping.kind.name(), "mapped");
        crash_point("mount:after-map");
        match self
            .format_and_mount(facts, &mapping, &mountpoint, read_only)
            .await
        {
            Ok(fstype) => Ok(ActiveVolume {
                pool: facts.pool.clone(),
                mountpoint,
                mapping,
                fstype,
                read_only,
                features: facts.stat.features,
                since: now(),
                refs: BTreeMap::new(),
                fenced: false,
            }),
            Err(e) => {
                if matches!(fs::mounted_at(&mountpoint), Ok(Some(_))) {
                    let _ = fs::umount(&mountpoint).await;
                }
                if let Err(undo) = mapper.unmap(&req, &mapping).await {
                    tracing::error!(volume = name, error = %undo, "could not unmap after a failed mount");
                }
                Err(e)
            }
        }
    }

    async fn format_and_mount(
        &self,
        facts: &ImageFacts,
        mapping: &Mapping,
        mountpoint: &Path,
        read_only: bool,
    ) -> Result<String> {
        let name = facts.name.as_str();
        let meta = |k: &str| facts.meta.get(k).cloned().unwrap_or_default();
        let declared = Some(meta("fstype"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "ext4".into());
        let device = &mapping.device;
        let found = fs::probe(device).await?;
        let marker = facts.meta.get("formatted").map(String::as_str);
        let mut marks: Vec<(&'static str, Option<String>)> = Vec::new();
        let fstype = match decide(name, &found, marker, read_only) {
            FormatDecision::Refuse(why) => return Err(Error::NotSupported(why)),
            FormatDecision::Mount { fstype } => {
                if fstype != declared {
                    tracing::warn!(volume = name, found = %fstype, declared = %declared, "mounting the filesystem found on the volume, not the declared one");
                }
                // A read-only device cannot be repaired; a dirty journal then makes
                // the read-only mount itself fail, with the kernel's reason.
                if !read_only {
                    fs::preen(&fstype, device).await?;
                }
                fstype
            }
            FormatDecision::Format => {
                let created_by_rbdvol = facts.meta.contains_key("created-at");
                // An image from elsewhere may hold raw data no probe recognises (a
                // database's raw device, an encrypted blob): format it only if nothing
                // was ever written to it.
                if !created_by_rbdvol && self.has_data(facts).await? {
                    return Err(Error::NotSupported(format!(
                        "volume {name} was not created by rbdvol and holds data that no filesystem signature explains; rbdvol will not format it. If it really is disposable, `rbd rm` it and create the volume with docker volume create"
                    )));
                }
                // Only an image rbdvol created and never mapped before is known to be zeros.
                let fresh = created_by_rbdvol && !facts.meta.contains_key("first-mapped");
                tracing::info!(volume = name, fstype = %declared, fresh, "volume is blank: formatting");
                fs::mkfs(&declared, &meta("mkfs-options"), fresh, device).await?;
                crash_point("mount:after-mkfs");
                let marker = format!("{declared} by {} at {}", self.host_id, now());
                marks.push(("formatted", Some(marker)));
                declared
            }
        };
        if !facts.meta.contains_key("first-mapped") {
            marks.push(("first-mapped", Some(now())));
        }
        // One metadata update for both marks (each opens the image).
        if !marks.is_empty() {
            self.set_meta(facts, marks).await?;
        }
        let options = fs::mount_options(
            &fstype,
            &meta("mount-options"),
            read_only,
            meta("allow-suid-dev") == "true",
        );
        fs::mount(device, mountpoint, &fstype, &options).await?;
        crash_point("mount:after-mount");
        tracing::info!(volume = name, mountpoint = %mountpoint.display(), fstype = %fstype, options = %options, "mounted");
        Ok(fstype)
    }

    async fn has_data(&self, facts: &ImageFacts) -> Result<bool> {
        let (pool, name) = (facts.pool.clone(), facts.name.clone());
        self.cluster
            .run(
                "reading the allocation map",
                super::LONG_DEADLINE,
                move |r| images::has_data(r, &pool, &name),
            )
            .await
    }

    async fn set_meta(
        &self,
        facts: &ImageFacts,
        pairs: Vec<(&'static str, Option<String>)>,
    ) -> Result<()> {
        let (pool, name) = (facts.pool.clone(), facts.name.clone());
        self.cluster
            .run("writing volume metadata", super::SHORT_DEADLINE, move |r| {
                images::set_meta(r, &pool, &name, &pairs)
            })
            .await
    }

    /// Unmounts and unmaps. A busy filesystem is an error and stays mounted.
    pub async fn detach(&self, name: &str, v: &ActiveVolume) -> Result<()> {
        fs::umount(&v.mountpoint).await?;
        crash_point("unmount:after-umount");
        let req = self.request_for(name, v);
        // The client address of an exporter that was fenced or has died, read before
        // it goes away with its state: once stopped, that client never comes back.
        let fenced_client = match v.mapping.kind {
            MapperKind::Userspace => {
                let exporters = self.mappers.exporters();
                let serving = exporters.health(&req, v.mapping.exporter_pid) == Health::Serving;
                exporters
                    .read_state(&req)
                    .and_then(|st| st.addr)
                    .filter(|_| !serving)
            }
            _ => None,
        };
        self.mappers
            .get(v.mapping.kind)
            .unmap(&req, &v.mapping)
            .await?;
        crash_point("unmount:after-unmap");
        if let Some(addr) = fenced_client {
            self.forget_fenced_client(name, addr).await;
        }
        let _ = std::fs::remove_dir(&v.mountpoint);
        tracing::info!(volume = name, "unmounted and unmapped");
        Ok(())
    }

    /// The blocklist entry that fenced this host's (now exited) exporter protects
    /// nothing any more: that client instance can never come back. Removing it keeps
    /// the blocklist to entries that matter; failing to is harmless (it expires).
    async fn forget_fenced_client(&self, name: &str, addr: String) {
        let a = addr.clone();
        let r = self
            .cluster
            .run("cleaning the blocklist", super::SHORT_DEADLINE, move |r| {
                images::unblocklist(r, &a)
            })
            .await;
        match r {
            Ok(()) => {
                tracing::info!(volume = name, client = %addr, "removed this host's exited, fenced client from the blocklist")
            }
            Err(e) => {
                tracing::warn!(volume = name, client = %addr, error = %e, "could not remove a stale blocklist entry; it expires by itself")
            }
        }
    }

    pub async fn health(&self, name: &str, v: &ActiveVolume) -> Health {
        if !matches!(fs::mounted_at(&v.mountpoint), Ok(Some(_))) {
            return Health::Gone;
        }
        let req = self.request_for(name, v);
        self.mappers
            .get(v.mapping.kind)
            .health(&req, &v.mapping)
            .await
    }

    /// After a start: adopts what is still consistent (mounted, mapped, referenced),
    /// releases everything else this plugin owns, and logs each decision.
    pub async fn reconcile(&self, table: &mut RefTable) {
        let names: Vec<String> = table.volumes.keys().cloned().collect();
        for name in names {
            let v = table.volumes[&name].clone();
            let health = self.health(&name, &v).await;
            match health {
                Health::Serving if v.total_refs() > 0 => {
                    tracing::info!(volume = %name, refs = v.total_refs(), mountpoint = %v.mountpoint.display(), "reconcile: adopted a mounted volume");
                }
                Health::Fenced if v.total_refs() > 0 => {
                    tracing::error!(volume = %name, "reconcile: volume is fenced on this host (another host owns it); refusing new mounts until its last unmount");
                    if let Some(rec) = table.volumes.get_mut(&name) {
                        rec.fenced = true;
                    }
                }
                _ => {
                    tracing::warn!(volume = %name, health = ?health, refs = v.total_refs(), "reconcile: releasing a volume that is no longer consistently mounted");
                    if matches!(fs::mounted_at(&v.mountpoint), Ok(Some(_))) {
                        if let Err(e) = fs::umount(&v.mountpoint).await {
                            tracing::error!(volume = %name, error = %e, "reconcile: cannot unmount; keeping the record");
                            continue;
                        }
                    }
                    let req = self.request_for(&name, &v);
                    if let Err(e) = self
                        .mappers
                        .get(v.mapping.kind)
                        .unmap(&req, &v.mapping)
                        .await
                    {
                        tracing::error!(volume = %name, error = %e, "reconcile: cannot unmap; keeping the record");
                        continue;
                    }
                    let _ = std::fs::remove_dir(&v.mountpoint);
                    table.volumes.remove(&name);
                }
            }
        }
        self.release_untracked(table).await;
        if let Err(e) = table.save() {
            tracing::error!(error = %e, "reconcile: cannot save the reference table");
        }
    }

    /// Mounts under the plugin's root and exporters that no record claims: a crash in
    /// the middle of a Mount (Docker got no answer, so no container uses them).
    async fn release_untracked(&self, table: &RefTable) {
        let tracked: Vec<&Path> = table
            .volumes
            .values()
            .map(|v| v.mountpoint.as_path())
            .collect();
        if let Ok(mounts) = fs::mounts() {
            for m in mounts.iter().rev() {
                // The root itself may be a mount point (a managed plugin's propagatedMount,
                // a bind): it is not ours to unmount, only what lies below it.
                if m.target != self.mount_root
                    && m.target.starts_with(&self.mount_root)
                    && !tracked.contains(&m.target.as_path())
                {
                    let r = fs::umount(&m.target).await;
                    tracing::warn!(mountpoint = %m.target.display(), result = ?r, "reconcile: unmounted an untracked mount");
                }
            }
        }
        for (pool, image) in self.mappers.exporters().known() {
            let claimed = table.volumes.iter().any(|(n, v)| {
                *n == image && v.pool == pool && v.mapping.kind == MapperKind::Userspace
            });
            if claimed {
                continue;
            }
            let req = self.request(&pool, &image, false, 0);
            let unused = Mapping {
                kind: MapperKind::Userspace,
                device: PathBuf::new(),
                exporter_pid: None,
            };
            match self
                .mappers
                .get(MapperKind::Userspace)
                .unmap(&req, &unused)
                .await
            {
                Ok(()) => {
                    tracing::warn!(pool = %pool, image = %image, "reconcile: stopped an untracked exporter")
                }
                Err(e) => {
                    tracing::error!(pool = %pool, image = %image, error = %e, "reconcile: cannot stop an untracked exporter")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_blank_never_formatted_writable_volume_is_formatted() {
        assert_eq!(
            decide("v", &Probe::Blank, None, false),
            FormatDecision::Format
        );
        for (probe, marker, ro) in [
            (Probe::Blank, Some("ext4 by a at t"), false),
            (Probe::Blank, None, true),
            (Probe::PartitionTable("gpt".into()), None, false),
            (Probe::Signature("crypto_LUKS".into()), None, false),
            (Probe::Signature("swap".into()), None, false),
            (Probe::Ambivalent, None, false),
        ] {
            assert!(
                matches!(decide("v", &probe, marker, ro), FormatDecision::Refuse(_)),
                "{probe:?} {marker:?} {ro}"
            );
        }
    }

    #[test]
    fn existing_filesystems_are_mounted_as_found() {
        assert_eq!(
            decide("v", &Probe::Signature("xfs".into()), None, false),
            FormatDecision::Mount {
                fstype: "xfs".into()
            }
        );
        assert_eq!(
            decide(
                "v",
                &Probe::Signature("ext4".into()),
                Some("ext4 by a"),
                true
            ),
            FormatDecision::Mount {
                fstype: "ext4".into()
            }
        );
    }

    #[test]
    fn refusals_say_that_nothing_was_touched() {
        let FormatDecision::Refuse(why) =
            decide("pg", &Probe::Blank, Some("ext4 by a at t"), false)
        else {
            panic!()
        };
        assert!(
            why.contains("will not format") && why.contains("pg"),
            "{why}"
        );
        let FormatDecision::Refuse(why) =
            decide("pg", &Probe::PartitionTable("dos".into()), None, false)
        else {
            panic!()
        };
        assert!(
            why.contains("dos partition table") && why.contains("untouched"),
            "{why}"
        );
    }
}

//! What a crash or restart left behind, put right before the daemon answers Docker:
//! records whose mount or mapping is gone, mounts under the mount root that no record
//! claims, exporters that no record claims, and kernel mappings (krbd, rbd-nbd) made by
//! a Mount that died before it recorded them.
//!
//! A kernel mapping holds the image's exclusive lock, so a leaked one keeps every other
//! host - and this one - from the volume until someone unmaps it. Which mappings are
//! rbdvol's is known from an intent file written (durably) before each kernel map and
//! removed once the mapping is recorded; mappings without one (an administrator's
//! `rbd device map`, another program's) are never touched.

use std::path::{Path, PathBuf};

use super::attach::Attacher;
use super::refs::RefTable;
use crate::error::{Error, Result};
use crate::host::mapper::{Health, KernelMapping, MapperKind, Mapping};

/// What to do with a kernel mapping no record claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeftoverAction {
    Release,
    Keep(String),
}

/// Decides about one kernel mapping found at start.
pub fn leftover_action(
    m: &KernelMapping,
    pools: &[String],
    claimed: bool,
    intended: bool,
    users: &[String],
) -> LeftoverAction {
    let keep = |why: &str| LeftoverAction::Keep(why.to_string());
    if !pools.contains(&m.pool) {
        return keep("not in this plugin's pools");
    }
    if !m.is(&m.pool, &m.image) {
        return keep("a snapshot mapping, which rbdvol never makes");
    }
    if claimed {
        return keep("recorded in the reference table (adopted)");
    }
    if !intended {
        return keep("rbdvol has no record of making it (mapped by hand or by another program); unmap it yourself if it is stale");
    }
    if !users.is_empty() {
        return LeftoverAction::Keep(format!("still in use: {}", users.join("; ")));
    }
    LeftoverAction::Release
}

/// Intent files: `<state_dir>/intents/<pool>/<image>`, one per kernel map under way.
#[derive(Debug, Clone)]
pub struct Intents {
    pub dir: PathBuf,
}

impl Intents {
    fn path(&self, pool: &str, image: &str) -> PathBuf {
        self.dir.join(pool).join(image)
    }

    /// Durably notes that this host is about to map `pool/image`.
    pub fn begin(&self, pool: &str, image: &str) -> Result<()> {
        let path = self.path(pool, image);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        let ctx = |what: &str| format!("{what} the map intent {}", path.display());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(ctx("creating"), e))?;
        std::fs::File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(ctx("writing"), e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(ctx("syncing"), e))
    }

    /// The mapping is recorded (or undone): the intent is spent.
    pub fn end(&self, pool: &str, image: &str) {
        let _ = std::fs::remove_file(self.path(pool, image));
    }

    pub fn exists(&self, pool: &str, image: &str) -> bool {
        self.path(pool, image).exists()
    }
}

impl Attacher {
    /// After a start: adopts what is still consistent (mounted, mapped, referenced),
    /// releases everything else this plugin owns, and logs each decision.
    pub async fn reconcile(&self, table: &mut RefTable) {
        let names: Vec<String> = table.volumes.keys().cloned().collect();
        for name in names {
            let v = table.volumes[&name].clone();
            let health = self.health(&name, &v).await;
            match health {
                Health::Serving if v.total_refs() > 0 => {
                    crate::metrics::reconcile("adopted");
                    tracing::info!(volume = %name, refs = v.total_refs(), mountpoint = %v.mountpoint.display(), "reconcile: adopted a mounted volume");
                }
                Health::Fenced if v.total_refs() > 0 => {
                    crate::metrics::reconcile("fenced");
                    tracing::error!(volume = %name, "reconcile: volume is fenced on this host (another host owns it); refusing new mounts until its last unmount");
                    if let Some(rec) = table.volumes.get_mut(&name) {
                        rec.fenced = true;
                    }
                }
                _ => {
                    tracing::warn!(volume = %name, health = ?health, refs = v.total_refs(), "reconcile: releasing a volume that is no longer consistently mounted");
                    // A device still in use is an error here: the record stays.
                    if let Err(e) = self.detach(&name, &v).await {
                        crate::metrics::reconcile("release_failed");
                        tracing::error!(volume = %name, error = %e, "reconcile: cannot release; keeping the record");
                        continue;
                    }
                    crate::metrics::reconcile("released");
                    table.volumes.remove(&name);
                }
            }
        }
        self.release_untracked(table).await;
        self.release_kernel_leftovers(table).await;
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
        if let Ok(mounts) = self.host.mounts() {
            for m in mounts.iter().rev() {
                // The root itself may be a mount point (a managed plugin's propagatedMount,
                // a bind): it is not ours to unmount, only what lies below it.
                if m.target == self.mount_root
                    || !m.target.starts_with(&self.mount_root)
                    || tracked.contains(&m.target.as_path())
                {
                    continue;
                }
                let uses = self.host.uses(m);
                if !uses.is_empty() {
                    crate::metrics::reconcile("untracked_in_use");
                    tracing::error!(mountpoint = %m.target.display(), uses = ?uses, "reconcile: an untracked mount is in use; leaving it");
                    continue;
                }
                let r = self.host.umount(&m.target).await;
                crate::metrics::reconcile("untracked_unmounted");
                tracing::warn!(mountpoint = %m.target.display(), result = ?r, "reconcile: unmounted an untracked mount");
            }
        }
        for mapper in self.mappers.all() {
            let kind = mapper.kind();
            for (pool, image) in mapper.unrecorded() {
                let claimed = table
                    .volumes
                    .iter()
                    .any(|(n, v)| *n == image && v.pool == pool && v.mapping.kind == kind);
                if claimed {
                    continue;
                }
                let req = self.request(&pool, &image, false, 0);
                let unused = Mapping {
                    kind,
                    device: PathBuf::new(),
                    exporter_pid: None,
                    backing: None,
                };
                match mapper.unmap(&req, &unused).await {
                    Ok(()) => {
                        crate::metrics::reconcile("mapping_released");
                        tracing::warn!(pool = %pool, image = %image, mapper = kind.name(), "reconcile: released an unrecorded mapping")
                    }
                    Err(e) => {
                        tracing::error!(pool = %pool, image = %image, error = %e, "reconcile: cannot release an unrecorded mapping")
                    }
                }
            }
        }
    }

    /// krbd and rbd-nbd mappings that a crash between map and record left behind.
    async fn release_kernel_leftovers(&self, table: &RefTable) {
        for kind in [MapperKind::Krbd, MapperKind::Nbd] {
            let mapper = self.mappers.get(kind);
            let found = match mapper.kernel_mappings().await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(mapper = kind.name(), error = %e, "reconcile: cannot list kernel mappings; leaks, if any, stay until the next start");
                    continue;
                }
            };
            for m in found {
                let claimed = table.volumes.iter().any(|(n, v)| {
                    *n == m.image && v.pool == m.pool && v.mapping.device == m.device
                });
                let intended = self.intents.exists(&m.pool, &m.image);
                let users = self
                    .host
                    .device_users(&m.device, &self.mountpoint(&m.pool, &m.image));
                let action = leftover_action(&m, &self.pools, claimed, intended, &users);
                let label = format!("{}/{}", m.pool, m.image);
                match action {
                    LeftoverAction::Keep(why) => {
                        if !claimed {
                            tracing::warn!(image = %label, device = %m.device.display(), mapper = kind.name(), reason = %why, "reconcile: leaving a kernel mapping alone");
                        }
                    }
                    LeftoverAction::Release => {
                        let req = self.request(&m.pool, &m.image, false, 0);
                        let mapping = Mapping {
                            kind,
                            device: m.device.clone(),
                            exporter_pid: None,
                            backing: None,
                        };
                        match mapper.unmap(&req, &mapping).await {
                            Ok(()) => {
                                self.intents.end(&m.pool, &m.image);
                                tracing::warn!(image = %label, device = %m.device.display(), mapper = kind.name(), "reconcile: unmapped a kernel mapping a crash left unrecorded")
                            }
                            Err(e) => {
                                tracing::error!(image = %label, device = %m.device.display(), error = %e, "reconcile: cannot unmap a leftover kernel mapping")
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(pool: &str, snap: &str) -> KernelMapping {
        KernelMapping {
            pool: pool.into(),
            image: "pg".into(),
            snap: snap.into(),
            device: "/dev/rbd0".into(),
        }
    }

    fn pools() -> Vec<String> {
        vec!["rbd".into(), "fast".into()]
    }

    #[test]
    fn a_crash_leftover_of_ours_that_nothing_uses_is_released() {
        assert_eq!(
            leftover_action(&mapping("rbd", "-"), &pools(), false, true, &[]),
            LeftoverAction::Release
        );
    }

    #[test]
    fn everything_else_is_left_alone_with_a_reason() {
        let in_use = ["mounted at /data in the mount namespace of pid 7".to_string()];
        for (m, claimed, intended, users, why) in [
            (mapping("other", "-"), false, true, &[][..], "pools"),
            (mapping("rbd", "nightly"), false, true, &[][..], "snapshot"),
            (mapping("rbd", "-"), true, true, &[][..], "adopted"),
            (mapping("rbd", "-"), false, false, &[][..], "no record"),
            (mapping("rbd", "-"), false, true, &in_use[..], "in use"),
        ] {
            match leftover_action(&m, &pools(), claimed, intended, users) {
                LeftoverAction::Keep(reason) => assert!(reason.contains(why), "{reason}"),
                LeftoverAction::Release => panic!("released {m:?} ({why})"),
            }
        }
    }

    #[test]
    fn intents_are_durable_files_per_image() {
        let dir = tempfile::tempdir().unwrap();
        let i = Intents {
            dir: dir.path().join("intents"),
        };
        assert!(!i.exists("rbd", "pg"));
        i.begin("rbd", "pg").unwrap();
        assert!(i.exists("rbd", "pg") && !i.exists("fast", "pg"));
        i.end("rbd", "pg");
        assert!(!i.exists("rbd", "pg"));
        i.end("rbd", "pg");
    }
}

//! This host's side of CSI: NodeStage mounts the volume (through [`Node::mount_as`],
//! so the exclusive lock, fencing and never-wipe mkfs are the Docker path's) and
//! bind-mounts it on the staging path; NodePublish bind-mounts the staging path into
//! the target. The stage holds one reference, named after its staging path, which only
//! NodeUnstage drops. Paths come from the CO: rbdvol creates the last component if it
//! is missing and nothing above it (swarmkit's staging paths are flat, moby/swarmkit#3197).

use std::path::{Component, Path};

use super::refs::CSI_STAGE_REF;
use super::Node;
use crate::error::{Error, Result};
use crate::volume::names;

/// A CO path: absolute, without `..`, not the root.
fn check_path(what: &str, p: &Path) -> Result<()> {
    let ok = p.is_absolute()
        && p.parent().is_some()
        && !p.components().any(|c| matches!(c, Component::ParentDir));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "{what} {:?} must be an absolute path without '..'",
            p.display()
        )))
    }
}

fn stage_ref(staging: &Path) -> String {
    format!("{CSI_STAGE_REF}{}", staging.display())
}

impl Node {
    fn staged_here(&self, name: &str, staging: &Path) -> bool {
        self.active(name)
            .is_some_and(|v| v.refs.contains_key(&stage_ref(staging)))
    }

    /// NodeStageVolume: map (holding the exclusive lock unless read-only), format only
    /// if provably blank, mount, and bind the mount on `staging`. Repeating it is a no-op.
    pub async fn stage(&self, name: &str, staging: &Path, read_only: bool) -> Result<()> {
        names::validate(name)?;
        check_path("staging_target_path", staging)?;
        let lock = self.csi_locks.get(name);
        let _serialised = lock.lock().await;
        let host = &self.attacher.host;
        let id = stage_ref(staging);
        if self.staged_here(name, staging) {
            let v = self.active(name).expect("checked above");
            if !read_only && v.read_only {
                return Err(Error::InUse {
                    name: name.into(),
                    holder: format!("staged read-only at {} on this host; unstage it before staging it read-write", staging.display()),
                });
            }
            if host.mounted_at(staging)?.is_some() {
                tracing::info!(volume = name, staging = %staging.display(), "stage: already staged");
                return Ok(());
            }
            // The reference survived (a restart) but the bind did not: bind again.
            host.create_leaf_dir(staging)?;
            return host.bind_mount(&v.mountpoint, staging, v.read_only).await;
        }
        if let Some(m) = host.mounted_at(staging)? {
            return Err(Error::InUse {
                name: name.into(),
                holder: format!(
                    "the staging path {} already has {} ({}) mounted on it, not this volume; unmount it first",
                    staging.display(),
                    m.source,
                    m.fstype
                ),
            });
        }
        host.create_leaf_dir(staging)?;
        let mountpoint = self.mount_as(name, &id, read_only).await?;
        if let Err(e) = host.bind_mount(&mountpoint, staging, read_only).await {
            if let Err(undo) = self.unmount(name, &id).await {
                tracing::error!(volume = name, error = %undo, "could not release a volume whose stage failed");
            }
            return Err(e);
        }
        tracing::info!(volume = name, staging = %staging.display(), read_only, "staged");
        Ok(())
    }

    /// NodeUnstageVolume: unmounts the staging path and drops the stage's reference; the
    /// last reference unmounts, unmaps and releases the lock. Repeating it is a no-op.
    pub async fn unstage(&self, name: &str, staging: &Path) -> Result<()> {
        names::validate(name)?;
        check_path("staging_target_path", staging)?;
        let lock = self.csi_locks.get(name);
        let _serialised = lock.lock().await;
        let host = &self.attacher.host;
        if host.mounted_at(staging)?.is_some() {
            host.umount(staging).await?;
        }
        self.unmount(name, &stage_ref(staging)).await?;
        tracing::info!(volume = name, staging = %staging.display(), "unstaged");
        Ok(())
    }

    /// NodePublishVolume: bind-mounts the staged volume on `target` (read-only when
    /// asked, or when it was staged read-only). Repeating it is a no-op.
    pub async fn publish(
        &self,
        name: &str,
        staging: &Path,
        target: &Path,
        read_only: bool,
    ) -> Result<()> {
        names::validate(name)?;
        check_path("staging_target_path", staging)?;
        check_path("target_path", target)?;
        let lock = self.csi_locks.get(name);
        let _serialised = lock.lock().await;
        let host = &self.attacher.host;
        let staged = match (self.staged_here(name, staging), host.mounted_at(staging)?) {
            (true, Some(m)) => m,
            _ => {
                return Err(Error::NotSupported(format!(
                "volume {name} is not staged at {} on this host; NodeStageVolume must come first",
                staging.display()
            )))
            }
        };
        let staged_ro = self.active(name).is_some_and(|v| v.read_only);
        if let Some(m) = host.mounted_at(target)? {
            if m.dev == staged.dev {
                return Ok(());
            }
            return Err(Error::InUse {
                name: name.into(),
                holder: format!(
                    "the target path {} already has {} mounted on it; unmount it first",
                    target.display(),
                    m.source
                ),
            });
        }
        host.create_leaf_dir(target)?;
        host.bind_mount(staging, target, read_only || staged_ro)
            .await?;
        tracing::info!(volume = name, target = %target.display(), read_only = read_only || staged_ro, "published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts `target` and removes the directory. Repeating it,
    /// or a target that was never published, is a no-op.
    pub async fn unpublish(&self, name: &str, target: &Path) -> Result<()> {
        names::validate(name)?;
        check_path("target_path", target)?;
        let lock = self.csi_locks.get(name);
        let _serialised = lock.lock().await;
        let host = &self.attacher.host;
        if host.mounted_at(target)?.is_some() {
            host.umount(target).await?;
        }
        host.remove_dir(target);
        tracing::info!(volume = name, target = %target.display(), "unpublished");
        Ok(())
    }
}

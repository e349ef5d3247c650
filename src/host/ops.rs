//! The host effects the node makes - probing, formatting, checking, mounting and
//! unmounting filesystems, reading the mount table, asking who uses a mount or device -
//! behind one narrow trait. [`RealHost`] does them on this machine (external commands
//! with deadlines, /proc); a fake in `crate::testing` keeps a mount table in memory and
//! fails on demand, so that rollback at every step of Mount and every reconcile path
//! are tested without root.

use std::path::Path;

use async_trait::async_trait;

use super::fs::{self, Content, MountEntry, Probe};
use super::usage::{self, OwnMount};
use crate::error::{Error, Result};

#[async_trait]
pub trait HostOps: Send + Sync {
    /// What `blkid -p` finds on the device.
    async fn probe(&self, device: &Path) -> Result<Probe>;
    /// Whether the device's first and last MiB read back as zeros.
    async fn sample(&self, device: &Path) -> Content;
    async fn mkfs(&self, fstype: &str, options: &str, fresh: bool, device: &Path) -> Result<()>;
    /// Preen-mode check; refuses damage that needs a person.
    async fn preen(&self, fstype: &str, device: &Path) -> Result<()>;
    async fn mount(&self, device: &Path, target: &Path, fstype: &str, options: &str) -> Result<()>;
    /// Bind-mounts `source` on `target` (read-only when asked).
    async fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts; not mounted counts as done, busy is an error.
    async fn umount(&self, target: &Path) -> Result<()>;
    /// Grows the mounted filesystem to fill its device (after a resize).
    async fn grow_fs(&self, fstype: &str, device: &Path, mountpoint: &Path) -> Result<()>;
    /// The mount table of this (the daemon's) mount namespace.
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    /// Uses of the filesystem mounted by `own` anywhere on the host, besides copies of it.
    fn uses(&self, own: &MountEntry) -> Vec<String>;
    /// What still holds a block device: mounts in any namespace (other than copies at
    /// `mountpoint`, rbdvol's own mount point for it), stacked devices.
    fn device_users(&self, device: &Path, mountpoint: &Path) -> Vec<String>;
    fn create_dir(&self, dir: &Path) -> Result<()>;
    /// Creates `dir` itself, never a parent (a path the CO hands over, where creating
    /// its parents would hide the CO's mistake); an existing directory is fine.
    fn create_leaf_dir(&self, dir: &Path) -> Result<()>;
    /// Removes an empty directory; failing to is harmless.
    fn remove_dir(&self, dir: &Path);

    /// The entry mounted at `target`, if any (the last one wins when stacked).
    fn mounted_at(&self, target: &Path) -> Result<Option<MountEntry>> {
        Ok(self
            .mounts()?
            .into_iter()
            .rev()
            .find(|m| m.target == target))
    }
}

/// This machine.
pub struct RealHost;

#[async_trait]
impl HostOps for RealHost {
    async fn probe(&self, device: &Path) -> Result<Probe> {
        fs::probe(device).await
    }

    async fn sample(&self, device: &Path) -> Content {
        fs::sample(device).await
    }

    async fn mkfs(&self, fstype: &str, options: &str, fresh: bool, device: &Path) -> Result<()> {
        fs::mkfs(fstype, options, fresh, device).await
    }

    async fn preen(&self, fstype: &str, device: &Path) -> Result<()> {
        fs::preen(fstype, device).await
    }

    async fn mount(&self, device: &Path, target: &Path, fstype: &str, options: &str) -> Result<()> {
        fs::mount(device, target, fstype, options).await
    }

    async fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        fs::bind_mount(source, target, read_only).await
    }

    async fn umount(&self, target: &Path) -> Result<()> {
        fs::umount(target).await
    }

    async fn grow_fs(&self, fstype: &str, device: &Path, mountpoint: &Path) -> Result<()> {
        super::grow::grow(fstype, device, mountpoint).await
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        fs::mounts()
    }

    fn uses(&self, own: &MountEntry) -> Vec<String> {
        usage::uses(&OwnMount::from_entry(own))
            .iter()
            .map(|u| u.to_string())
            .collect()
    }

    fn device_users(&self, device: &Path, mountpoint: &Path) -> Vec<String> {
        usage::device_users(device, mountpoint)
    }

    fn create_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
    }

    fn create_leaf_dir(&self, dir: &Path) -> Result<()> {
        match std::fs::create_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
            Err(e) => Err(Error::io(
                format!(
                    "creating {} (its parent must exist; rbdvol creates nothing above it)",
                    dir.display()
                ),
                e,
            )),
        }
    }

    fn remove_dir(&self, dir: &Path) {
        let _ = std::fs::remove_dir(dir);
    }
}

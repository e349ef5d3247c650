//! Mapping an RBD image to a block device on this host, behind one trait with three
//! implementations: the kernel client (krbd), rbd-nbd, and rbdvol's own userspace
//! mapper (an `rbdvol export` process serving the image as a FUSE file, plus a loop
//! device) for kernels with neither. Every mapper holds the image's exclusive lock
//! non-cooperatively through its own client instance, so Ceph refuses a second writer
//! and a lock break fences only that one image.
//!
//! One file per mapper: `krbd.rs` and `nbd.rs` drive the `rbd` tool and share
//! `kernel_map.rs` (what a kernel device maps, the `rbd device` commands); [`userspace`]
//! starts and stops its exporter processes and loop devices itself. The exporter
//! program (`rbdvol export`, [`crate::export`]) is separate; the two meet only in the
//! state-file type in [`userspace::state`].

mod kernel_map;
mod krbd;
pub mod msgr;
mod nbd;
pub mod userspace;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use kernel_map::KernelMapping;
pub use krbd::{unsupported_by_kernel, unsupported_features_error, Krbd};
pub use nbd::Nbd;
pub use userspace::{Exporters, Userspace};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapperKind {
    Krbd,
    Nbd,
    Userspace,
}

impl MapperKind {
    pub fn name(self) -> &'static str {
        match self {
            MapperKind::Krbd => "krbd",
            MapperKind::Nbd => "nbd",
            MapperKind::Userspace => "userspace",
        }
    }
}

/// What to map.
#[derive(Debug, Clone)]
pub struct MapRequest {
    pub pool: String,
    pub image: String,
    pub read_only: bool,
    /// The image's RBD feature bits (krbd must support every one of them).
    pub features: u64,
    pub host_id: String,
    /// How long to wait for the exclusive lock (a dead owner is fenced meanwhile).
    pub lock_wait: Duration,
    /// Where the node mounts the image: copies of that mount in other namespaces are
    /// not uses of the device.
    pub mountpoint: PathBuf,
    /// krbd only: the messenger mode to map with (None: the kernel's default, v1) and
    /// why it was chosen (see [`msgr`]).
    pub ms_mode: Option<String>,
    pub ms_mode_why: String,
}

/// A live mapping, as persisted in the reference table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub kind: MapperKind,
    pub device: PathBuf,
    /// Userspace mapper only: the exporter's pid.
    #[serde(default)]
    pub exporter_pid: Option<u32>,
    /// Userspace mapper only: the loop device's backing file as the kernel recorded it
    /// at attach time ("major:minor:inode"), to tell our loop device from one that
    /// another program attached after ours went away.
    #[serde(default)]
    pub backing: Option<String>,
}

/// How a mapping is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// This host lost the image's lock (blocklisted or broken): it must not write.
    Fenced,
    Gone,
}

#[async_trait]
pub trait Mapper: Send + Sync {
    fn kind(&self) -> MapperKind;
    /// Maps the image and returns its block device, holding the exclusive lock.
    async fn map(&self, req: &MapRequest) -> Result<Mapping>;
    /// Unmaps; unmapping something already gone succeeds.
    async fn unmap(&self, req: &MapRequest, mapping: &Mapping) -> Result<()>;
    async fn health(&self, req: &MapRequest, mapping: &Mapping) -> Health;
    /// The kernel's mappings of this kind (krbd, nbd), for finding what a crash left
    /// unrecorded. The userspace mapper's leftovers are found by [`Mapper::unrecorded`].
    async fn kernel_mappings(&self) -> Result<Vec<KernelMapping>> {
        Ok(Vec::new())
    }
    /// (pool, image) of every mapping this mapper keeps state for on this host, recorded
    /// or not (the userspace mapper's exporter directories).
    fn unrecorded(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// The client address of a mapping that was fenced or has died, if it is about to be
    /// released: its blocklist entry then protects nothing.
    /// I/O done through the mapping, where the mapper counts it (the userspace
    /// exporter does; the kernel's clients are measured by the kernel's own tools).
    fn io_stats(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<userspace::state::IoStats> {
        None
    }
    fn fenced_client(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<String> {
        None
    }
    /// Whether, while a writable mapping holds the image's exclusive lock, every other
    /// client's write to the image (its metadata included) is refused. librbd lock
    /// owners (rbd-nbd, rbdvol's exporter) carry out such requests for their peers; the
    /// kernel client does not, so the daemon's own writes fail with EROFS.
    fn refuses_peer_writes(&self) -> bool {
        false
    }
    /// The mapping's client instance address (`IP:PORT/NONCE`), where the mapper
    /// cannot tell by itself that it was fenced: the node then looks for it on the
    /// OSD blocklist.
    fn client_addr(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<String> {
        None
    }
}

/// Refuses to release a block device that anything still holds: a mount of it in any
/// mount namespace, or a device stacked on it. Releasing it would give a container
/// I/O errors and lose what it had not synced.
pub fn ensure_unused(device: &Path, mountpoint: &Path) -> Result<()> {
    let users = crate::host::usage::device_users(device, mountpoint);
    if users.is_empty() {
        return Ok(());
    }
    Err(Error::InUse {
        name: device.display().to_string(),
        holder: format!(
            "{}; rbdvol will not release a device that is still in use",
            users.join("; ")
        ),
    })
}

/// Which mapper `map.mapper = "auto"` picks on this host, and why.
pub fn detect() -> (MapperKind, String) {
    let modules = std::fs::read_to_string(format!(
        "/lib/modules/{}/modules.dep",
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
    .unwrap_or_default();
    // krbd and nbd are driven through the `rbd` tool; without it only userspace works.
    let rbd_cli = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("rbd").is_file()))
        .unwrap_or(false);
    if !rbd_cli {
        return (
            MapperKind::Userspace,
            "the `rbd` command (ceph-common) is not installed, which krbd and nbd need; using rbdvol's FUSE exporter with loop devices".into(),
        );
    }
    if Path::new("/sys/bus/rbd").exists() || modules.contains("/rbd.ko") {
        return (MapperKind::Krbd, "the kernel has the rbd module".into());
    }
    if Path::new("/sys/module/nbd").exists() || modules.contains("/nbd.ko") {
        return (
            MapperKind::Nbd,
            "no rbd kernel module, but nbd is available".into(),
        );
    }
    (
        MapperKind::Userspace,
        "the kernel has neither rbd nor nbd; using rbdvol's FUSE exporter with loop devices".into(),
    )
}

/// A mapping request and cluster settings shared by the mappers' unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::time::Duration;

    use super::MapRequest;
    use crate::config::CephSettings;

    pub fn ceph() -> CephSettings {
        CephSettings {
            conf: "/etc/ceph/ceph.conf".into(),
            keyring: Some("/etc/ceph/k".into()),
            client_id: "docker".into(),
            ..Default::default()
        }
    }

    pub fn req(read_only: bool) -> MapRequest {
        MapRequest {
            pool: "rbd".into(),
            image: "pg-data".into(),
            read_only,
            features: 1 | 4,
            host_id: "h".into(),
            lock_wait: Duration::from_secs(30),
            mountpoint: "/var/lib/rbdvol/mounts/rbd/pg-data".into(),
            ms_mode: None,
            ms_mode_why: String::new(),
        }
    }
}

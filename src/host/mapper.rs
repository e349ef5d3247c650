//! Mapping an RBD image to a block device on this host, behind one trait with three
//! implementations: the kernel client (krbd), rbd-nbd, and rbdvol's own userspace
//! mapper (an `rbdvol export` process serving the image as a FUSE file, plus a loop
//! device) for kernels with neither. Every mapper holds the image's exclusive lock
//! non-cooperatively through its own client instance, so Ceph refuses a second writer
//! and a lock break fences only that one image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::command::run_ok;
use super::exporter_proc::Exporters;
pub use super::kernel_map::KernelMapping;
use super::kernel_map::{device_list, krbd_identity, nbd_identity};
use crate::config::CephSettings;
use crate::error::{Error, Result};
use crate::volume::feature_names;

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
    fn fenced_client(&self, _req: &MapRequest, _mapping: &Mapping) -> Option<String> {
        None
    }
}

const RBD_DEADLINE: Duration = Duration::from_secs(90);

/// The image features this kernel's rbd module cannot map, if any.
pub fn unsupported_by_kernel(image_features: u64, kernel_supported: u64) -> u64 {
    image_features & !kernel_supported
}

/// The error users of other plugins only ever saw as "exit status 6".
pub fn unsupported_features_error(req: &MapRequest, unsupported: u64, supported: u64) -> Error {
    Error::NotSupported(format!(
        "volume {} uses RBD features {} that this kernel's rbd module cannot map (it supports {}). Fix: `rbd feature disable {}/{} {}`, or set map.mapper = \"nbd\" or \"userspace\" in the rbdvol config, or create volumes with -o features=layering,exclusive-lock",
        req.image,
        feature_names(unsupported),
        feature_names(supported),
        req.pool,
        req.image,
        feature_names(unsupported).replace(',', " "),
    ))
}

/// Common `rbd` CLI arguments naming the cluster and user.
fn rbd_identity(ceph: &CephSettings) -> Vec<String> {
    let mut a = vec![
        "--cluster".into(),
        ceph.cluster.clone(),
        "--id".into(),
        ceph.client_id.clone(),
        "-c".into(),
        ceph.conf.display().to_string(),
    ];
    if let Some(k) = &ceph.keyring {
        a.extend(["--keyring".into(), k.display().to_string()]);
    }
    a
}

/// Runs `rbd device map …` and takes the device it prints.
async fn rbd_map(kind: MapperKind, argv: Vec<String>) -> Result<Mapping> {
    let out = run_ok("rbd", argv, RBD_DEADLINE).await?;
    Ok(Mapping {
        kind,
        device: PathBuf::from(out.stdout.trim()),
        exporter_pid: None,
        backing: None,
    })
}

/// Refuses to release a block device that anything still holds: a mount of it in any
/// mount namespace, or a device stacked on it. Releasing it would give a container
/// I/O errors and lose what it had not synced.
pub fn ensure_unused(device: &Path, mountpoint: &Path) -> Result<()> {
    let users = super::usage::device_users(device, mountpoint);
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

/// Runs `rbd device unmap …` if the device is still the mapping of this image (after
/// a reboot, /dev/rbdN may be another image's, or another program's) and unused.
async fn rbd_unmap(
    req: &MapRequest,
    mapping: &Mapping,
    identity: Option<KernelMapping>,
    argv: Vec<String>,
) -> Result<()> {
    if !mapping.device.exists() {
        return Ok(());
    }
    match identity {
        Some(k) if k.is(&req.pool, &req.image) => {}
        other => {
            tracing::warn!(device = %mapping.device.display(), image = %format!("{}/{}", req.pool, req.image), now = ?other, "not unmapping: the device no longer maps this image");
            return Ok(());
        }
    }
    ensure_unused(&mapping.device, &req.mountpoint)?;
    run_ok("rbd", argv, RBD_DEADLINE).await.map(|_| ())
}

/// A kernel-backed mapping lives as long as its device node maps this image.
fn device_health(req: &MapRequest, mapping: &Mapping, identity: Option<KernelMapping>) -> Health {
    match identity {
        Some(k) if mapping.device.exists() && k.is(&req.pool, &req.image) => Health::Serving,
        _ => Health::Gone,
    }
}

/// The kernel RBD client: `rbd device map -t krbd -o exclusive,noshare`.
pub struct Krbd {
    pub ceph: CephSettings,
    /// Where the kernel lists supported features (`/sys/bus/rbd/supported_features`).
    pub sysfs: PathBuf,
}

impl Krbd {
    /// `exclusive` disables the cooperative lock hand-over (a live owner is never
    /// preempted); `noshare` gives each mapping its own client instance, so a takeover
    /// fences one image, not every volume on the host; `noudev` where udev is absent.
    pub fn map_argv(&self, req: &MapRequest, udev: bool) -> Vec<String> {
        let mut opts = vec!["exclusive", "noshare"];
        if !udev {
            opts.push("noudev");
        }
        let mut a: Vec<String> = ["device", "map", "-t", "krbd", "-o"]
            .map(String::from)
            .to_vec();
        a.push(opts.join(","));
        if req.read_only {
            a.push("--read-only".into());
        }
        a.extend(rbd_identity(&self.ceph));
        a.push(format!("{}/{}", req.pool, req.image));
        a
    }

    pub fn unmap_argv(&self, mapping: &Mapping, udev: bool) -> Vec<String> {
        let mut a: Vec<String> = ["device", "unmap", "-t", "krbd"].map(String::from).to_vec();
        if !udev {
            a.extend(["-o".into(), "noudev".into()]);
        }
        a.push(mapping.device.display().to_string());
        a
    }

    fn supported_features(&self) -> Result<u64> {
        let text = std::fs::read_to_string(self.sysfs.join("supported_features"))
            .map_err(|e| Error::io("reading the kernel's supported rbd features", e))?;
        let t = text.trim().trim_start_matches("0x");
        u64::from_str_radix(t, 16).map_err(|_| {
            Error::NotSupported(format!(
                "cannot read the kernel's rbd features from {text:?}"
            ))
        })
    }
}

fn udev_running() -> bool {
    Path::new("/run/udev/control").exists()
}

#[async_trait]
impl Mapper for Krbd {
    fn kind(&self) -> MapperKind {
        MapperKind::Krbd
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping> {
        let supported = self.supported_features()?;
        let missing = unsupported_by_kernel(req.features, supported);
        if missing != 0 {
            return Err(unsupported_features_error(req, missing, supported));
        }
        rbd_map(MapperKind::Krbd, self.map_argv(req, udev_running())).await
    }

    async fn unmap(&self, req: &MapRequest, mapping: &Mapping) -> Result<()> {
        let identity = krbd_identity(&self.sysfs, &mapping.device);
        rbd_unmap(
            req,
            mapping,
            identity,
            self.unmap_argv(mapping, udev_running()),
        )
        .await
    }

    async fn health(&self, req: &MapRequest, mapping: &Mapping) -> Health {
        device_health(req, mapping, krbd_identity(&self.sysfs, &mapping.device))
    }

    async fn kernel_mappings(&self) -> Result<Vec<KernelMapping>> {
        if !self.sysfs.exists() {
            return Ok(Vec::new());
        }
        device_list("krbd").await
    }
}

/// rbd-nbd: `rbd device map -t nbd --exclusive`.
pub struct Nbd {
    pub ceph: CephSettings,
}

impl Nbd {
    pub fn map_argv(&self, req: &MapRequest) -> Vec<String> {
        let mut a: Vec<String> = ["device", "map", "-t", "nbd", "--exclusive"]
            .map(String::from)
            .to_vec();
        if req.read_only {
            a.push("--read-only".into());
        }
        a.extend(rbd_identity(&self.ceph));
        a.push(format!("{}/{}", req.pool, req.image));
        a
    }

    pub fn unmap_argv(&self, mapping: &Mapping) -> Vec<String> {
        let mut a: Vec<String> = ["device", "unmap", "-t", "nbd"].map(String::from).to_vec();
        a.push(mapping.device.display().to_string());
        a
    }
}

#[async_trait]
impl Mapper for Nbd {
    fn kind(&self) -> MapperKind {
        MapperKind::Nbd
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping> {
        rbd_map(MapperKind::Nbd, self.map_argv(req)).await
    }

    async fn unmap(&self, req: &MapRequest, mapping: &Mapping) -> Result<()> {
        let identity = nbd_identity(&mapping.device);
        rbd_unmap(req, mapping, identity, self.unmap_argv(mapping)).await
    }

    async fn health(&self, req: &MapRequest, mapping: &Mapping) -> Health {
        device_health(req, mapping, nbd_identity(&mapping.device))
    }

    async fn kernel_mappings(&self) -> Result<Vec<KernelMapping>> {
        if !Path::new("/sys/module/nbd").exists() {
            return Ok(Vec::new());
        }
        device_list("nbd").await
    }
}

/// rbdvol's own userspace mapper: `rbdvol export` (FUSE file over librbd, holding the
/// exclusive lock) plus a loop device on that file.
pub struct Userspace {
    pub exporters: Exporters,
}

#[async_trait]
impl Mapper for Userspace {
    fn kind(&self) -> MapperKind {
        MapperKind::Userspace
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping> {
        let exporter = self.exporters.start(req).await?;
        let attached = match super::loopdev::attach(&exporter.file, req.read_only).await {
            Ok(device) => super::loopdev::identity(&device)
                .await
                .map(|backing| (device, backing)),
            Err(e) => Err(e),
        };
        match attached {
            Ok((device, backing)) => Ok(Mapping {
                kind: MapperKind::Userspace,
                device,
                exporter_pid: Some(exporter.pid),
                backing,
            }),
            Err(e) => {
                // A loop device attached before the identity read failed is on our file.
                if let Ok(devices) = super::loopdev::backing(&exporter.file).await {
                    for d in devices {
                        let _ = super::loopdev::detach(&d).await;
                    }
                }
                self.exporters.stop(req, Some(exporter.pid)).await;
                Err(e)
            }
        }
    }

    async fn unmap(&self, req: &MapRequest, mapping: &Mapping) -> Result<()> {
        let file = self.exporters.image_file(req);
        // Every loop device on the exporter's file: the recorded one, and any a crash
        // left behind before it was recorded.
        let mut devices = super::loopdev::backing(&file).await?;
        // Once the exporter's FUSE mount is gone, the recorded device's backing path no
        // longer reads as our file; the identity the kernel recorded at attach time
        // still tells ours from a device another program attached since (after a
        // reboot, say). A device that is not provably ours is left alone.
        let recorded = &mapping.device;
        if !recorded.as_os_str().is_empty() && !devices.contains(recorded) {
            let now = super::loopdev::identity(recorded).await.ok().flatten();
            if now.is_some() && now == mapping.backing {
                devices.push(recorded.clone());
            } else if now.is_some() {
                tracing::warn!(device = %recorded.display(), image = %format!("{}/{}", req.pool, req.image), "not detaching: the loop device now backs another file");
            }
        }
        for d in devices {
            ensure_unused(&d, &req.mountpoint)?;
            super::loopdev::detach(&d).await?;
        }
        self.exporters.stop(req, mapping.exporter_pid).await;
        Ok(())
    }

    async fn health(&self, req: &MapRequest, mapping: &Mapping) -> Health {
        self.exporters.health(req, mapping.exporter_pid)
    }

    fn unrecorded(&self) -> Vec<(String, String)> {
        self.exporters.known()
    }

    fn fenced_client(&self, req: &MapRequest, mapping: &Mapping) -> Option<String> {
        let serving = self.exporters.health(req, mapping.exporter_pid) == Health::Serving;
        self.exporters
            .read_state(req)
            .and_then(|st| st.addr)
            .filter(|_| !serving)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ceph() -> CephSettings {
        CephSettings {
            conf: "/etc/ceph/ceph.conf".into(),
            keyring: Some("/etc/ceph/k".into()),
            client_id: "docker".into(),
            ..Default::default()
        }
    }

    fn req(read_only: bool) -> MapRequest {
        MapRequest {
            pool: "rbd".into(),
            image: "pg-data".into(),
            read_only,
            features: 1 | 4,
            host_id: "h".into(),
            lock_wait: Duration::from_secs(30),
            mountpoint: "/var/lib/rbdvol/mounts/rbd/pg-data".into(),
        }
    }

    #[test]
    fn krbd_maps_exclusively_with_its_own_client() {
        let k = Krbd {
            ceph: ceph(),
            sysfs: "/sys/bus/rbd".into(),
        };
        assert_eq!(
            k.map_argv(&req(false), false).join(" "),
            "device map -t krbd -o exclusive,noshare,noudev --cluster ceph --id docker -c /etc/ceph/ceph.conf --keyring /etc/ceph/k rbd/pg-data"
        );
        assert_eq!(
            k.map_argv(&req(true), true).join(" "),
            "device map -t krbd -o exclusive,noshare --read-only --cluster ceph --id docker -c /etc/ceph/ceph.conf --keyring /etc/ceph/k rbd/pg-data"
        );
        let m = Mapping {
            kind: MapperKind::Krbd,
            device: "/dev/rbd3".into(),
            exporter_pid: None,
            backing: None,
        };
        assert_eq!(
            k.unmap_argv(&m, false).join(" "),
            "device unmap -t krbd -o noudev /dev/rbd3"
        );
    }

    #[test]
    fn nbd_maps_exclusively() {
        let n = Nbd { ceph: ceph() };
        assert_eq!(
            n.map_argv(&req(true)).join(" "),
            "device map -t nbd --exclusive --read-only --cluster ceph --id docker -c /etc/ceph/ceph.conf --keyring /etc/ceph/k rbd/pg-data"
        );
    }

    #[test]
    fn unsupported_kernel_features_are_named_with_the_fix() {
        // A 4.x kernel: layering, striping, exclusive-lock, data-pool (0x87).
        let r = MapRequest {
            features: 1 | 4 | 8 | 16 | 32,
            ..req(false)
        };
        let missing = unsupported_by_kernel(r.features, 0x87);
        assert_eq!(missing, 8 | 16 | 32);
        let msg = unsupported_features_error(&r, missing, 0x87).to_string();
        assert!(msg.contains("object-map,fast-diff,deep-flatten"), "{msg}");
        assert!(
            msg.contains("rbd feature disable rbd/pg-data object-map fast-diff deep-flatten"),
            "{msg}"
        );
        assert!(
            msg.contains("layering,striping,exclusive-lock,data-pool"),
            "{msg}"
        );
        assert_eq!(unsupported_by_kernel(1 | 4, 0x3f), 0);
    }

    #[tokio::test]
    async fn krbd_refuses_before_running_anything_when_features_do_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("supported_features"), "0x5\n").unwrap();
        let k = Krbd {
            ceph: ceph(),
            sysfs: dir.path().into(),
        };
        let r = MapRequest {
            features: 1 | 4 | 8,
            ..req(false)
        };
        let err = k.map(&r).await.unwrap_err().to_string();
        assert!(
            err.contains("object-map") && err.contains("cannot map"),
            "{err}"
        );
    }

    #[test]
    fn a_device_that_maps_another_image_is_not_this_volume() {
        // After a reboot the recorded /dev/rbdN maps another image, or nothing at all.
        let m = Mapping {
            kind: MapperKind::Krbd,
            device: "/dev/null".into(),
            exporter_pid: None,
            backing: None,
        };
        let ours = KernelMapping {
            pool: "rbd".into(),
            image: "pg-data".into(),
            snap: "-".into(),
            device: "/dev/null".into(),
        };
        assert_eq!(
            device_health(&req(false), &m, Some(ours.clone())),
            Health::Serving
        );
        let theirs = KernelMapping {
            image: "other".into(),
            ..ours
        };
        assert_eq!(device_health(&req(false), &m, Some(theirs)), Health::Gone);
        assert_eq!(device_health(&req(false), &m, None), Health::Gone);
    }

    #[tokio::test]
    async fn a_device_that_maps_another_image_is_never_unmapped() {
        // /dev/null exists; an identity for another image must stop before `rbd` runs
        // (an `rbd` that ran would fail here: there is no such device to unmap).
        let other = KernelMapping {
            pool: "rbd".into(),
            image: "someone-else".into(),
            snap: "-".into(),
            device: "/dev/null".into(),
        };
        let m = Mapping {
            kind: MapperKind::Krbd,
            device: "/dev/null".into(),
            exporter_pid: None,
            backing: None,
        };
        let argv = vec!["device".into(), "unmap".into(), "/dev/null".into()];
        rbd_unmap(&req(false), &m, Some(other), argv.clone())
            .await
            .unwrap();
        rbd_unmap(&req(false), &m, None, argv).await.unwrap();
    }
}

//! What a kernel mapping (krbd or rbd-nbd) maps: the pool and image behind /dev/rbdN or
//! /dev/nbdN, read cheaply from sysfs or the rbd-nbd process for every health check and
//! before every unmap, and the full list from `rbd device list` for reconciling after a
//! crash. After a reboot or a crash the device recorded for a volume may map another
//! image, or belong to another program: it is released only if it is still ours.
//! Also the `rbd device map|unmap` steps krbd and nbd share.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ensure_unused, Health, MapRequest, MapperKind, Mapping};
use crate::config::CephSettings;
use crate::error::{Error, Result};
use crate::host::command::run_ok;

const RBD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(90);

/// What a kernel mapping (krbd or rbd-nbd) maps, as the kernel or `rbd device list`
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KernelMapping {
    pub pool: String,
    /// krbd lists it as `name`, rbd-nbd as `image`.
    #[serde(alias = "name")]
    pub image: String,
    #[serde(default)]
    pub snap: String,
    pub device: PathBuf,
}

impl KernelMapping {
    /// True when this maps the image itself (not a snapshot) of `pool`/`image`.
    pub fn is(&self, pool: &str, image: &str) -> bool {
        self.pool == pool && self.image == image && matches!(self.snap.as_str(), "" | "-")
    }
}

/// Parses `rbd device list -t krbd|nbd --format json`.
pub fn parse_device_list(json: &str) -> Result<Vec<KernelMapping>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|e| Error::Command {
        program: "rbd".into(),
        detail: format!("cannot read `rbd device list --format json`: {e}"),
    })
}

/// Every mapping of this kind the kernel has, for reconciling after a crash.
pub(super) async fn device_list(kind: &str) -> Result<Vec<KernelMapping>> {
    let out = run_ok(
        "rbd",
        ["device", "list", "-t", kind, "--format", "json"],
        RBD_DEADLINE,
    )
    .await?;
    parse_device_list(&out.stdout)
}

/// What `/dev/rbdN` maps, from sysfs (cheap enough for every health check).
pub(super) fn krbd_identity(sysfs: &Path, device: &Path) -> Option<KernelMapping> {
    let id = device.file_name()?.to_str()?.strip_prefix("rbd")?;
    let dir = sysfs.join("devices").join(id);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .map(|s| s.trim().to_string())
    };
    Some(KernelMapping {
        pool: read("pool")?,
        image: read("name")?,
        snap: read("current_snap").unwrap_or_default(),
        device: device.to_path_buf(),
    })
}

/// What `/dev/nbdN` maps: the image named on the command line of the rbd-nbd process
/// the kernel says serves it.
pub(super) fn nbd_identity(device: &Path) -> Option<KernelMapping> {
    let name = device.file_name()?.to_str()?;
    let pid = std::fs::read_to_string(format!("/sys/block/{name}/pid")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).ok()?;
    nbd_identity_from_cmdline(&cmdline, device)
}

/// The `POOL/IMAGE[@SNAP]` argument of an rbd-nbd command line (NUL-separated).
pub fn nbd_identity_from_cmdline(cmdline: &[u8], device: &Path) -> Option<KernelMapping> {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let spec = args.iter().skip_while(|a| *a != "map").nth(1)?;
    let (spec, snap) = spec.split_once('@').unwrap_or((spec, ""));
    let (pool, image) = spec.split_once('/')?;
    Some(KernelMapping {
        pool: pool.to_string(),
        image: image.to_string(),
        snap: snap.to_string(),
        device: device.to_path_buf(),
    })
}

/// Common `rbd` CLI arguments naming the cluster and user.
pub(super) fn rbd_identity(ceph: &CephSettings) -> Vec<String> {
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
pub(super) async fn rbd_map(kind: MapperKind, argv: Vec<String>) -> Result<Mapping> {
    let out = run_ok("rbd", argv, RBD_DEADLINE).await?;
    Ok(Mapping {
        kind,
        device: PathBuf::from(out.stdout.trim()),
        exporter_pid: None,
        backing: None,
    })
}

/// Runs `rbd device unmap …` if the device is still the mapping of this image (after
/// a reboot, /dev/rbdN may be another image's, or another program's) and unused.
pub(super) async fn rbd_unmap(
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
pub(super) fn device_health(
    req: &MapRequest,
    mapping: &Mapping,
    identity: Option<KernelMapping>,
) -> Health {
    match identity {
        Some(k) if mapping.device.exists() && k.is(&req.pool, &req.image) => Health::Serving,
        _ => Health::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mapper::fixtures::req;

    #[test]
    fn kernel_device_lists_are_read_for_both_clients() {
        // krbd says "name", rbd-nbd says "image" (and its id is a pid).
        let krbd = r#"[{"id":"0","pool":"rbd","namespace":"","name":"pg","snap":"-","device":"/dev/rbd0"},
                       {"id":"1","pool":"rbd","namespace":"","name":"pg","snap":"nightly","device":"/dev/rbd1"}]"#;
        let l = parse_device_list(krbd).unwrap();
        assert_eq!(l.len(), 2);
        assert!(l[0].is("rbd", "pg"));
        assert!(!l[1].is("rbd", "pg"), "a snapshot mapping is not the image");
        let nbd = r#"[{"id":4242,"pool":"fast","namespace":"","image":"q","snap":"-","device":"/dev/nbd0"}]"#;
        let l = parse_device_list(nbd).unwrap();
        assert!(l[0].is("fast", "q") && !l[0].is("rbd", "q"));
        assert_eq!(l[0].device, PathBuf::from("/dev/nbd0"));
        assert!(parse_device_list("").unwrap().is_empty());
        assert!(parse_device_list("{garbage").is_err());
    }

    #[test]
    fn krbd_identity_comes_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("devices/3");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("pool"), "rbd\n").unwrap();
        std::fs::write(dev.join("name"), "pg\n").unwrap();
        std::fs::write(dev.join("current_snap"), "-\n").unwrap();
        let k = krbd_identity(dir.path(), Path::new("/dev/rbd3")).unwrap();
        assert!(k.is("rbd", "pg"));
        assert!(krbd_identity(dir.path(), Path::new("/dev/rbd4")).is_none());
    }

    #[test]
    fn nbd_identity_comes_from_the_rbd_nbd_command_line() {
        let cmd = b"rbd-nbd\0--device\0/dev/nbd0\0map\0rbd/pg-data\0--exclusive\0";
        let k = nbd_identity_from_cmdline(cmd, Path::new("/dev/nbd0")).unwrap();
        assert!(k.is("rbd", "pg-data"));
        let snap = b"rbd-nbd\0map\0rbd/pg-data@s1\0";
        let k = nbd_identity_from_cmdline(snap, Path::new("/dev/nbd0")).unwrap();
        assert!(!k.is("rbd", "pg-data"));
        assert!(nbd_identity_from_cmdline(b"sleep\x00100\x00", Path::new("/dev/nbd0")).is_none());
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

//! The kernel RBD client: `rbd device map -t krbd`, after checking that this kernel's
//! rbd module supports every feature of the image (a mismatch otherwise surfaces as a
//! bare "exit status 6").

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::kernel_map::{
    device_health, device_list, krbd_identity, rbd_identity, rbd_map, rbd_unmap,
};
use super::{Health, KernelMapping, MapRequest, Mapper, MapperKind, Mapping};
use crate::config::CephSettings;
use crate::error::{Error, Result};
use crate::volume::feature_names;

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

/// The kernel RBD client: `rbd device map -t krbd -o exclusive,noshare`.
pub struct Krbd {
    pub ceph: CephSettings,
    /// Where the kernel lists supported features (`/sys/bus/rbd/supported_features`).
    pub sysfs: PathBuf,
}

impl Krbd {
    /// `exclusive` disables the cooperative lock hand-over (a live owner is never
    /// preempted); `noshare` gives each mapping its own client instance, so a takeover
    /// fences one image, not every volume on the host; `noudev` where udev is absent;
    /// `ms_mode` where the cluster needs msgr2 (see [`super::msgr`]).
    pub fn map_argv(&self, req: &MapRequest, udev: bool) -> Vec<String> {
        let mut opts = vec!["exclusive".to_string(), "noshare".to_string()];
        if !udev {
            opts.push("noudev".into());
        }
        if let Some(mode) = &req.ms_mode {
            opts.push(format!("ms_mode={mode}"));
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
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        super::msgr::check_kernel(req.ms_mode.as_deref(), &req.ms_mode_why, &release)?;
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

    fn refuses_peer_writes(&self) -> bool {
        true
    }

    /// From sysfs (`client_addr`), for a device that still maps this image.
    fn client_addr(&self, req: &MapRequest, mapping: &Mapping) -> Option<String> {
        let k = krbd_identity(&self.sysfs, &mapping.device)?;
        if !k.is(&req.pool, &req.image) {
            return None;
        }
        let id = mapping.device.file_name()?.to_str()?.strip_prefix("rbd")?;
        let addr = std::fs::read_to_string(self.sysfs.join("devices").join(id).join("client_addr"));
        addr.ok()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
    }

    async fn kernel_mappings(&self) -> Result<Vec<KernelMapping>> {
        if !self.sysfs.exists() {
            return Ok(Vec::new());
        }
        device_list("krbd").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mapper::fixtures::{ceph, req};

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
        let v2 = MapRequest {
            ms_mode: Some("prefer-crc".into()),
            ..req(false)
        };
        assert_eq!(
            k.map_argv(&v2, true).join(" "),
            "device map -t krbd -o exclusive,noshare,ms_mode=prefer-crc --cluster ceph --id docker -c /etc/ceph/ceph.conf --keyring /etc/ceph/k rbd/pg-data"
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
}

//! rbd-nbd: `rbd device map -t nbd`, for kernels without the rbd module but with nbd.

use std::path::Path;

use async_trait::async_trait;

use super::kernel_map::{
    device_health, device_list, nbd_identity, rbd_identity, rbd_map, rbd_unmap,
};
use super::{Health, KernelMapping, MapRequest, Mapper, MapperKind, Mapping};
use crate::config::CephSettings;
use crate::error::Result;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mapper::fixtures::{ceph, req};

    #[test]
    fn nbd_maps_exclusively() {
        let n = Nbd { ceph: ceph() };
        assert_eq!(
            n.map_argv(&req(true)).join(" "),
            "device map -t nbd --exclusive --read-only --cluster ceph --id docker -c /etc/ceph/ceph.conf --keyring /etc/ceph/k rbd/pg-data"
        );
    }
}

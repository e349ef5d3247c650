//! rbdvol's own userspace mapper, for kernels with neither rbd nor nbd: one detached
//! `rbdvol export` process per image (a FUSE file over librbd, holding the exclusive
//! lock), plus a loop device on that file. Everything it keeps on the host - exporter
//! processes, their state files and FUSE mounts, loop devices - is handled here and
//! reached from outside only through the [`Mapper`] trait.

mod exporters;
mod loopdev;
pub mod state;

use async_trait::async_trait;

use super::{ensure_unused, Health, MapRequest, Mapper, MapperKind, Mapping};
use crate::error::Result;
pub use exporters::Exporters;

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
        let attached = match loopdev::attach(&exporter.file, req.read_only).await {
            Ok(device) => loopdev::identity(&device)
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
                if let Ok(devices) = loopdev::backing(&exporter.file).await {
                    for d in devices {
                        let _ = loopdev::detach(&d).await;
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
        let mut devices = loopdev::backing(&file).await?;
        // Once the exporter's FUSE mount is gone, the recorded device's backing path no
        // longer reads as our file; the identity the kernel recorded at attach time
        // still tells ours from a device another program attached since (after a
        // reboot, say). A device that is not provably ours is left alone.
        let recorded = &mapping.device;
        if !recorded.as_os_str().is_empty() && !devices.contains(recorded) {
            let now = loopdev::identity(recorded).await.ok().flatten();
            if now.is_some() && now == mapping.backing {
                devices.push(recorded.clone());
            } else if now.is_some() {
                tracing::warn!(device = %recorded.display(), image = %format!("{}/{}", req.pool, req.image), "not detaching: the loop device now backs another file");
            }
        }
        for d in devices {
            ensure_unused(&d, &req.mountpoint)?;
            loopdev::detach(&d).await?;
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

    fn io_stats(&self, req: &MapRequest, _mapping: &Mapping) -> Option<state::IoStats> {
        self.exporters.io_stats(req)
    }

    fn fenced_client(&self, req: &MapRequest, mapping: &Mapping) -> Option<String> {
        let serving = self.exporters.health(req, mapping.exporter_pid) == Health::Serving;
        self.exporters
            .read_state(req)
            .and_then(|st| st.addr)
            .filter(|_| !serving)
    }
}

//! The CSI Controller service (Swarm runs it on managers): create, delete, publish,
//! validate and list, on the same [`crate::controller::Controller`] Docker's API uses.
//! Parameters are rbdvol's volume options (`pool`, `fstype`, `features`, ...); the size
//! comes from the capacity range. The single-writer rule itself is the exclusive lock,
//! taken at NodeStage: ControllerPublish refuses what can never be served (unknown
//! volumes, multi-writer modes) and leaves a dead writer's takeover to the lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use tonic::{Request, Response, Status};

use super::creds::{Credentials, Picked};
use super::{bad, check_capabilities, status, volume_id, Backends};
use crate::config::CephSettings;
use crate::controller::Controller;
use crate::error::Error;
use crate::volume::key;

type Reply<T> = std::result::Result<Response<T>, Status>;

pub struct CsiController {
    backends: Arc<Backends>,
    creds: Credentials,
}

impl CsiController {
    pub fn new(backends: Arc<Backends>, ceph: CephSettings) -> CsiController {
        CsiController {
            backends,
            creds: Credentials::new(ceph),
        }
    }

    /// The controller for a request's secrets (the user's own connection) or none.
    fn pick(&self, secrets: &HashMap<String, String>) -> std::result::Result<Picked<'_>, Status> {
        self.creds
            .pick(&self.backends.controller, secrets)
            .map_err(status)
    }

    /// The image size for a capacity range: the required bytes (rounded up to the 4 KiB
    /// rbdvol rounds to), else the limit, else the configured default (None).
    fn size_for(range: Option<&csi::CapacityRange>) -> std::result::Result<Option<u64>, Status> {
        let Some(r) = range else { return Ok(None) };
        if r.required_bytes < 0 || r.limit_bytes < 0 {
            return Err(bad(
                "capacity_range: required_bytes and limit_bytes must not be negative",
            ));
        }
        let (req, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
        let size = match (req, limit) {
            (0, 0) => return Ok(None),
            (0, l) => l / 4096 * 4096,
            (r, _) => r.div_ceil(4096) * 4096,
        };
        if limit > 0 && size > limit {
            return Err(status(Error::InvalidOption {
                key: "capacity_range".into(),
                value: format!("required {req}, limit {limit}"),
                reason: "rbdvol sizes volumes in 4 KiB units and no such size lies in the range; widen the range (--required-bytes / --limit-bytes)".into(),
            }));
        }
        Ok(Some(size))
    }

    async fn volume(
        &self,
        c: &Controller,
        name: &str,
        context: HashMap<String, String>,
    ) -> Reply<csi::CreateVolumeResponse> {
        let info = c.get(name).await.map_err(status)?;
        let mut volume_context = context;
        volume_context.insert("pool".into(), info.pool.clone());
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                capacity_bytes: info.size as i64,
                volume_id: name.to_string(),
                volume_context,
                ..Default::default()
            }),
        }))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for CsiController {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Reply<csi::CreateVolumeResponse> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(bad("name is required"));
        }
        let name = volume_id(&req.name)?;
        check_capabilities(&req.volume_capabilities).map_err(bad)?;
        if req.volume_content_source.is_some() {
            return Err(bad("creating a volume from a snapshot or another volume is not supported by rbdvol's CSI plugin"));
        }
        if req.parameters.contains_key(key::SIZE) {
            return Err(bad("the size comes from the capacity range: use --required-bytes (and --limit-bytes), not --opt size"));
        }
        let mut opts: BTreeMap<String, String> = req.parameters.clone().into_iter().collect();
        if let Some(size) = Self::size_for(req.capacity_range.as_ref())? {
            opts.insert(key::SIZE.into(), size.to_string());
        }
        let c = self.pick(&req.secrets)?;
        c.create(name, &opts).await.map_err(status)?;
        self.volume(&c, name, HashMap::new()).await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Reply<csi::DeleteVolumeResponse> {
        let name = volume_id(&req.get_ref().volume_id)?.to_string();
        let b = &self.backends;
        let c = self.pick(&req.get_ref().secrets)?;
        // As Docker's Remove: never while mounted on this host; the cluster refuses
        // while any other host holds or watches the image; the policy says trash or not.
        match b.node.while_unmounted(&name, c.remove(&name)).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(e) => Err(status(e)),
        }
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Reply<csi::ControllerPublishVolumeResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        if req.node_id.is_empty() {
            return Err(bad("node_id is required"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| bad("volume_capability is required"))?;
        let sharing = super::check_capability(cap).map_err(bad)?;
        let c = self.pick(&req.secrets)?;
        c.get(name).await.map_err(status)?;
        let readonly = req.readonly || sharing == super::Sharing::ReadOnly;
        tracing::info!(volume = name, node = %req.node_id, readonly, "csi: published (the node takes the lock at stage)");
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context: HashMap::from([("readonly".to_string(), readonly.to_string())]),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Reply<csi::ControllerUnpublishVolumeResponse> {
        volume_id(&req.get_ref().volume_id)?;
        // The node released the lock at unstage; a dead node's lock is taken over
        // (and the node fenced) by the next stage elsewhere.
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<csi::ValidateVolumeCapabilitiesResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(bad("volume_capabilities is required"));
        }
        let c = self.pick(&req.secrets)?;
        c.get(name).await.map_err(status)?;
        let reply = match check_capabilities(&req.volume_capabilities) {
            Ok(_) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
            Err(why) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(reply))
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Reply<csi::ListVolumesResponse> {
        let req = req.into_inner();
        if req.max_entries < 0 {
            return Err(bad("max_entries must not be negative"));
        }
        let start = match req.starting_token.as_str() {
            "" => 0,
            t => t.parse::<usize>().map_err(|_| {
                Status::aborted(format!(
                    "starting_token {t:?} was not issued by this plugin; list again from the start"
                ))
            })?,
        };
        let mut names = self.backends.controller.list().await.map_err(status)?;
        names.sort();
        if start > names.len() {
            return Err(Status::aborted(format!(
                "starting_token {start} is past the end ({} volumes); list again from the start",
                names.len()
            )));
        }
        let take = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let page: Vec<_> = names.iter().skip(start).take(take).cloned().collect();
        let end = start + page.len();
        Ok(Response::new(csi::ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|n| csi::list_volumes_response::Entry {
                    volume: Some(csi::Volume {
                        volume_id: n,
                        ..Default::default()
                    }),
                    status: None,
                })
                .collect(),
            next_token: if end < names.len() {
                end.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Reply<csi::ControllerGetCapabilitiesResponse> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let caps = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn get_capacity(
        &self,
        _: Request<csi::GetCapacityRequest>,
    ) -> Reply<csi::GetCapacityResponse> {
        Err(Status::unimplemented(
            "GetCapacity is not offered (not advertised)",
        ))
    }
    async fn create_snapshot(
        &self,
        _: Request<csi::CreateSnapshotRequest>,
    ) -> Reply<csi::CreateSnapshotResponse> {
        Err(Status::unimplemented(
            "snapshots are not offered through CSI",
        ))
    }
    async fn delete_snapshot(
        &self,
        _: Request<csi::DeleteSnapshotRequest>,
    ) -> Reply<csi::DeleteSnapshotResponse> {
        Err(Status::unimplemented(
            "snapshots are not offered through CSI",
        ))
    }
    async fn list_snapshots(
        &self,
        _: Request<csi::ListSnapshotsRequest>,
    ) -> Reply<csi::ListSnapshotsResponse> {
        Err(Status::unimplemented(
            "snapshots are not offered through CSI",
        ))
    }
    async fn controller_expand_volume(
        &self,
        _: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Reply<csi::ControllerExpandVolumeResponse> {
        Err(Status::unimplemented(
            "expansion is not offered through CSI",
        ))
    }
    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Reply<csi::ControllerGetVolumeResponse> {
        Err(Status::unimplemented(
            "ControllerGetVolume is not offered (not advertised)",
        ))
    }
    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Reply<csi::ControllerModifyVolumeResponse> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not offered (not advertised)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
        Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn capacity_ranges_become_4k_sizes_within_the_range() {
        let size = |r: Option<csi::CapacityRange>| CsiController::size_for(r.as_ref());
        assert_eq!(size(None).unwrap(), None);
        assert_eq!(size(range(0, 0)).unwrap(), None);
        assert_eq!(size(range(1 << 30, 0)).unwrap(), Some(1 << 30));
        assert_eq!(size(range(1000, 0)).unwrap(), Some(4096));
        assert_eq!(size(range(0, 10_000)).unwrap(), Some(8192));
        assert_eq!(size(range(5000, 8192)).unwrap(), Some(8192));
        assert!(
            size(range(5000, 6000)).is_err(),
            "no 4 KiB multiple in [5000, 6000]"
        );
        assert!(size(range(-1, 0)).is_err());
    }
}

//! The CSI Node service (every Swarm node): stage, publish and their reverses on
//! [`crate::node::Node`], and the node ID, which is this host's id: the name the lock
//! owner record, `rbdvol lock ls` and "in use on HOST" errors show.

use std::path::Path;
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use tonic::{Request, Response, Status};

use super::{bad, check_capability, status, volume_id, Backends, Sharing};

type Reply<T> = std::result::Result<Response<T>, Status>;

pub struct CsiNode {
    backends: Arc<Backends>,
}

impl CsiNode {
    pub fn new(backends: Arc<Backends>) -> CsiNode {
        CsiNode { backends }
    }
}

fn required<'a>(what: &str, v: &'a str) -> std::result::Result<&'a Path, Status> {
    if v.is_empty() {
        return Err(bad(format!("{what} is required")));
    }
    Ok(Path::new(v))
}

fn sharing(cap: Option<&csi::VolumeCapability>) -> std::result::Result<Sharing, Status> {
    let cap = cap.ok_or_else(|| bad("volume_capability is required"))?;
    check_capability(cap).map_err(bad)
}

#[tonic::async_trait]
impl csi::node_server::Node for CsiNode {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Reply<csi::NodeStageVolumeResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        let read_only = sharing(req.volume_capability.as_ref())? == Sharing::ReadOnly
            || req
                .publish_context
                .get("readonly")
                .is_some_and(|v| v == "true");
        self.backends
            .node
            .stage(name, staging, read_only)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Reply<csi::NodeUnstageVolumeResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        self.backends
            .node
            .unstage(name, staging)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Reply<csi::NodePublishVolumeResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        let target = required("target_path", &req.target_path)?;
        let read_only =
            req.readonly || sharing(req.volume_capability.as_ref())? == Sharing::ReadOnly;
        self.backends
            .node
            .publish(name, staging, target, read_only)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Reply<csi::NodeUnpublishVolumeResponse> {
        let req = req.into_inner();
        let name = volume_id(&req.volume_id)?;
        let target = required("target_path", &req.target_path)?;
        self.backends
            .node
            .unpublish(name, target)
            .await
            .map_err(status)?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Reply<csi::NodeGetCapabilitiesResponse> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![csi::NodeServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::StageUnstageVolume as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Reply<csi::NodeGetInfoResponse> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.backends.node.host_id().to_string(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Reply<csi::NodeGetVolumeStatsResponse> {
        Err(Status::unimplemented(
            "NodeGetVolumeStats is not offered (not advertised)",
        ))
    }

    async fn node_expand_volume(
        &self,
        _: Request<csi::NodeExpandVolumeRequest>,
    ) -> Reply<csi::NodeExpandVolumeResponse> {
        Err(Status::unimplemented(
            "expansion is not offered through CSI",
        ))
    }
}

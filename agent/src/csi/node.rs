//! CSI Node service (placeholder being replaced).

use std::sync::Arc;

use pmem_proto::csi;
use pmem_proto::csi::node_server::Node;
use tonic::{Request, Response, Status};

use crate::driver::Driver;

#[derive(Debug, Clone)]
pub struct NodeService {
    driver: Arc<Driver>,
}

impl NodeService {
    pub fn new(driver: Arc<Driver>) -> NodeService {
        NodeService { driver }
    }
}

/// Node start-up work after reconciliation.
pub async fn startup(_driver: &Arc<Driver>) {}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeStageVolume"))
    }
    async fn node_unstage_volume(
        &self,
        _r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeUnstageVolume"))
    }
    async fn node_publish_volume(
        &self,
        _r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented("NodePublishVolume"))
    }
    async fn node_unpublish_volume(
        &self,
        _r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeUnpublishVolume"))
    }
    async fn node_get_volume_stats(
        &self,
        _r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("NodeGetVolumeStats"))
    }
    async fn node_expand_volume(
        &self,
        _r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeExpandVolume"))
    }
    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }
    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let d = &self.driver;
        let max = crate::rpc::blocking(&d.alloc, |a| a.max_volumes())
            .await
            .map_err(Status::from)?;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: d.cfg.node_id.clone(),
            max_volumes_per_node: i64::try_from(max).unwrap_or(i64::MAX),
            accessible_topology: Some(crate::csi::params::node_topology(&d.cfg.node_id)),
        }))
    }
}

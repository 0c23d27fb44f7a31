//! CSI Identity service.

use std::collections::HashMap;
use std::sync::Arc;

use pmem_proto::csi;
use pmem_proto::csi::identity_server::Identity;
use pmem_proto::csi::plugin_capability::{self, service, volume_expansion};
use tonic::{Request, Response, Status};

use crate::driver::Driver;
use crate::rpc::call;

#[derive(Debug, Clone)]
pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    pub fn new(driver: Arc<Driver>) -> IdentityService {
        IdentityService { driver }
    }
}

fn service_cap(t: service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let d = &self.driver;
        call(&d.metrics, "GetPluginInfo", "", async {
            Ok(csi::GetPluginInfoResponse {
                name: d.cfg.driver_name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                manifest: HashMap::from([
                    ("backend".to_owned(), d.backend.clone()),
                    ("node".to_owned(), d.cfg.node_id.clone()),
                ]),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        call(&self.driver.metrics, "GetPluginCapabilities", "", async {
            Ok(csi::GetPluginCapabilitiesResponse {
                capabilities: vec![
                    service_cap(service::Type::ControllerService),
                    service_cap(service::Type::VolumeAccessibilityConstraints),
                    csi::PluginCapability {
                        r#type: Some(plugin_capability::Type::VolumeExpansion(
                            plugin_capability::VolumeExpansion {
                                r#type: volume_expansion::Type::Online as i32,
                            },
                        )),
                    },
                ],
            })
        })
        .await
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = self.driver.is_ready();
        call(&self.driver.metrics, "Probe", "", async move {
            Ok(csi::ProbeResponse { ready: Some(ready) })
        })
        .await
    }
}

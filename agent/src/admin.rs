//! The admin API (`pmem.admin.v1`) on its own socket: regions, volumes,
//! reconciliation. Used by `pmemctl` and the tests.

use std::collections::HashMap;
use std::sync::Arc;

use pmem_allocator::{InventoryItem, Owner, RegionCapacity, Usage, Volume};
use pmem_proto::admin;
use pmem_proto::admin::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::driver::Driver;
use crate::error::{AgentError, invalid};
use crate::rpc::{blocking, call};

#[derive(Debug, Clone)]
pub struct AdminService {
    driver: Arc<Driver>,
}

impl AdminService {
    pub fn new(driver: Arc<Driver>) -> AdminService {
        AdminService { driver }
    }
}

fn region(c: &RegionCapacity, backend: &str) -> admin::Region {
    admin::Region {
        id: c.spec.id.clone(),
        backend: backend.to_owned(),
        size_bytes: c.spec.size.0,
        align_bytes: c.spec.align.0,
        available_bytes: c.available.0,
        largest_allocatable_bytes: c.largest.0,
        minimum_volume_bytes: c.minimum.0,
        namespace_slots: c.spec.ns_slots,
        free_namespace_slots: c.free_slots,
        numa_node: c.spec.numa_node,
        location: c.spec.location.clone(),
        extents: c
            .extents
            .iter()
            .map(|(e, owner)| admin::Extent {
                offset_bytes: e.offset.0,
                size_bytes: e.len.0,
                volume_id: owner.as_ref().map(|o| o.0.clone()).unwrap_or_default(),
                state: owner.as_ref().map(|o| o.1.to_string()).unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn volume(v: &Volume, pubs: &[pmem_allocator::Publication]) -> admin::Volume {
    admin::Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        region: v.region.clone(),
        offset_bytes: v.offset.0,
        size_bytes: v.size.0,
        requested_bytes: v.requested.0,
        usage: v.usage.as_str().to_owned(),
        erase_after: v.erase_after,
        persistency: v.persistency.as_str().to_owned(),
        state: v.state.to_string(),
        device: v.device.clone().unwrap_or_default(),
        parameters: v
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        context: v
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        publications: pubs
            .iter()
            .filter(|p| p.volume_id == v.id)
            .map(|p| admin::Publication {
                kind: p.kind.as_str().to_owned(),
                path: p.path.clone(),
                readonly: p.readonly,
            })
            .collect(),
    }
}

fn device(i: &InventoryItem) -> admin::Device {
    admin::Device {
        region: i.region.clone(),
        path: i.path.clone(),
        offset_bytes: i.offset.0,
        size_bytes: i.size.0,
        owner: match &i.owner {
            Owner::Ours(id) => id.clone(),
            Owner::Foreign(what) => what.clone(),
        },
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_regions(
        &self,
        _req: Request<admin::ListRegionsRequest>,
    ) -> Result<Response<admin::ListRegionsResponse>, Status> {
        let d = &self.driver;
        call(&d.metrics, "admin.ListRegions", "", async {
            let caps = blocking(&d.alloc, |a| a.capacity(Usage::AppDirect)).await?;
            let kind = d.alloc.backend().kind();
            Ok(admin::ListRegionsResponse {
                regions: caps.iter().map(|c| region(c, kind)).collect(),
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<admin::ListVolumesRequest>,
    ) -> Result<Response<admin::ListVolumesResponse>, Status> {
        let d = &self.driver;
        let req = req.into_inner();
        call(&d.metrics, "admin.ListVolumes", "", async move {
            if !req.state.is_empty() && req.state.parse::<pmem_allocator::VolumeState>().is_err() {
                return Err(invalid(format!(
                    "state {:?} is not one of creating, ready, deleting, erasing",
                    req.state
                )));
            }
            if !req.persistency.is_empty()
                && req
                    .persistency
                    .parse::<pmem_allocator::Persistency>()
                    .is_err()
            {
                return Err(invalid(format!(
                    "persistency {:?} is not persistent or ephemeral",
                    req.persistency
                )));
            }
            let (vols, pubs) =
                blocking(&d.alloc, |a| Ok((a.volumes()?, a.publications(None)?))).await?;
            Ok(admin::ListVolumesResponse {
                volumes: vols
                    .iter()
                    .filter(|v| req.state.is_empty() || v.state.as_str() == req.state)
                    .filter(|v| {
                        req.persistency.is_empty() || v.persistency.as_str() == req.persistency
                    })
                    .map(|v| volume(v, &pubs))
                    .collect(),
            })
        })
        .await
    }

    async fn get_volume(
        &self,
        req: Request<admin::GetVolumeRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        let d = &self.driver;
        let id = req.into_inner().volume_id;
        let subject = id.clone();
        call(&d.metrics, "admin.GetVolume", &subject, async move {
            if id.is_empty() {
                return Err(invalid("volume_id is required"));
            }
            let lookup = id.clone();
            let (v, pubs) = blocking(&d.alloc, move |a| {
                Ok((a.volume(&lookup)?, a.publications(Some(&lookup))?))
            })
            .await?;
            let v = v.ok_or_else(|| AgentError::NotFound(format!("volume {id} does not exist")))?;
            Ok(volume(&v, &pubs))
        })
        .await
    }

    async fn reconcile(
        &self,
        req: Request<admin::ReconcileRequest>,
    ) -> Result<Response<admin::ReconcileReport>, Status> {
        let d = &self.driver;
        let req = req.into_inner();
        call(&d.metrics, "admin.Reconcile", "", async move {
            let rep = blocking(&d.alloc, move |a| {
                a.reconcile(req.dry_run, req.remove_orphans)
            })
            .await?;
            d.metrics.record_reconcile(&rep);
            let mut actions = rep.actions.clone();
            actions.extend(rep.errors.iter().map(|e| format!("error: {e}")));
            Ok(admin::ReconcileReport {
                actions,
                orphans: rep.orphans.iter().map(device).collect(),
                foreign: rep.foreign.iter().map(device).collect(),
                missing: rep.missing.clone(),
                dry_run: rep.dry_run,
            })
        })
        .await
    }
}

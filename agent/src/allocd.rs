//! The allocator service (`pmem.admin.v1.Allocator`) that `pmem-allocd`
//! serves: the embedded allocator's API over a unix socket. Errors keep
//! their meaning in the gRPC code (`wire::error_to_status`).

use std::sync::Arc;

use pmem_allocator::{
    Allocator, Bytes, CreateRequest, Error, Persistency, PublicationKind, VolumeState,
};
use pmem_proto::admin;
use pmem_proto::admin::allocator_server;
use tonic::{Request, Response, Status};

use crate::store::VolumeStore;
use crate::wire;

#[derive(Debug, Clone)]
pub struct AllocatorService {
    alloc: Arc<Allocator>,
}

impl AllocatorService {
    pub fn new(alloc: Arc<Allocator>) -> AllocatorService {
        AllocatorService { alloc }
    }

    /// Runs allocator work on the blocking pool and logs failures once.
    async fn run<T, F>(&self, method: &'static str, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Allocator) -> Result<T, Error> + Send + 'static,
    {
        let a = Arc::clone(&self.alloc);
        let start = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || f(&a))
            .await
            .map_err(|e| Status::internal(format!("allocator task failed: {e}")))?;
        let ms = (start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        match r {
            Ok(v) => {
                tracing::debug!(method, duration_ms = ms, "allocator call");
                Ok(Response::new(v))
            }
            Err(e) => {
                let s = wire::error_to_status(&e);
                tracing::info!(method, duration_ms = ms, code = ?s.code(), error = %e, "allocator call");
                Err(s)
            }
        }
    }
}

fn volume_wire(a: &Allocator, v: &pmem_allocator::Volume) -> Result<admin::Volume, Error> {
    let pubs = a.publications(Some(&v.id))?;
    Ok(wire::volume_to_wire(v, a.usable_of(v), &pubs))
}

fn limit(b: u64) -> Option<Bytes> {
    (b != 0).then_some(Bytes(b))
}

#[tonic::async_trait]
impl allocator_server::Allocator for AllocatorService {
    async fn create_volume(
        &self,
        r: Request<admin::AllocCreateRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        let r = r.into_inner();
        self.run("CreateVolume", move |a| {
            let req = CreateRequest {
                name: r.name,
                required: Bytes(r.required_bytes),
                limit: limit(r.limit_bytes),
                usage: wire::usage_from_wire(&r.usage)?,
                erase_after: r.erase_after,
                parameters: r.parameters.into_iter().collect(),
                persistency: wire::persistency_from_wire(&r.persistency)?,
                context: r.context.into_iter().collect(),
                region: (!r.region.is_empty()).then_some(r.region),
            };
            let v = a.create_volume(&req)?;
            volume_wire(a, &v)
        })
        .await
    }

    async fn delete_volume(
        &self,
        r: Request<admin::GetVolumeRequest>,
    ) -> Result<Response<admin::Empty>, Status> {
        let id = r.into_inner().volume_id;
        self.run("DeleteVolume", move |a| {
            a.delete_volume(&id).map(|()| admin::Empty {})
        })
        .await
    }

    async fn expand_volume(
        &self,
        r: Request<admin::AllocExpandRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        let r = r.into_inner();
        self.run("ExpandVolume", move |a| {
            let v = a.expand_volume(&r.volume_id, Bytes(r.required_bytes), limit(r.limit_bytes))?;
            volume_wire(a, &v)
        })
        .await
    }

    async fn get_volume(
        &self,
        r: Request<admin::GetVolumeRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        let id = r.into_inner().volume_id;
        self.run("GetVolume", move |a| match a.volume(&id)? {
            Some(v) => volume_wire(a, &v),
            None => Err(Error::NotFound(format!("volume {id} does not exist"))),
        })
        .await
    }

    async fn get_volume_by_name(
        &self,
        r: Request<admin::GetVolumeByNameRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        let name = r.into_inner().name;
        self.run("GetVolumeByName", move |a| {
            match a.volume_by_name(&name)? {
                Some(v) => volume_wire(a, &v),
                None => Err(Error::NotFound(format!("no volume named {name:?}"))),
            }
        })
        .await
    }

    async fn list_volumes(
        &self,
        r: Request<admin::ListVolumesRequest>,
    ) -> Result<Response<admin::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        self.run("ListVolumes", move |a| {
            let state = (!r.state.is_empty())
                .then(|| r.state.parse::<VolumeState>())
                .transpose()
                .map_err(|_| Error::InvalidArgument(format!("state {:?} is not valid", r.state)))?;
            let persistency = (!r.persistency.is_empty())
                .then(|| r.persistency.parse::<Persistency>())
                .transpose()
                .map_err(|_| {
                    Error::InvalidArgument(format!("persistency {:?} is not valid", r.persistency))
                })?;
            let pubs = a.publications(None)?;
            let volumes = a
                .volumes_where(state, persistency)?
                .iter()
                .map(|v| {
                    wire::volume_to_wire(v, a.usable_of(v), wire::publications_of(&pubs, &v.id))
                })
                .collect();
            Ok(admin::ListVolumesResponse { volumes })
        })
        .await
    }

    async fn list_volume_page(
        &self,
        r: Request<admin::VolumePageRequest>,
    ) -> Result<Response<admin::VolumePageResponse>, Status> {
        let r = r.into_inner();
        self.run("ListVolumePage", move |a| {
            let max = usize::try_from(r.max_entries).unwrap_or(usize::MAX);
            Ok(wire::page_to_wire(&a.live_volumes_page(r.after_seq, max)?))
        })
        .await
    }

    async fn capacity_summary(
        &self,
        r: Request<admin::CapacityRequest>,
    ) -> Result<Response<admin::ListRegionsResponse>, Status> {
        let usage = r.into_inner().usage;
        self.run("CapacitySummary", move |a| {
            let caps = a.capacity_summary(wire::usage_from_wire(&usage)?);
            let kind = a.backend().kind();
            Ok(admin::ListRegionsResponse {
                regions: caps.iter().map(|c| wire::region_to_wire(c, kind)).collect(),
            })
        })
        .await
    }

    async fn volume_counts(
        &self,
        _r: Request<admin::Empty>,
    ) -> Result<Response<admin::VolumeCountsResponse>, Status> {
        self.run("VolumeCounts", move |a| {
            Ok(wire::counts_to_wire(&a.volume_counts()?))
        })
        .await
    }

    async fn capacity(
        &self,
        r: Request<admin::CapacityRequest>,
    ) -> Result<Response<admin::ListRegionsResponse>, Status> {
        let usage = r.into_inner().usage;
        self.run("Capacity", move |a| {
            let caps = a.capacity(wire::usage_from_wire(&usage)?)?;
            let kind = a.backend().kind();
            Ok(admin::ListRegionsResponse {
                regions: caps.iter().map(|c| wire::region_to_wire(c, kind)).collect(),
            })
        })
        .await
    }

    async fn max_volumes(
        &self,
        _r: Request<admin::Empty>,
    ) -> Result<Response<admin::MaxVolumesResponse>, Status> {
        self.run("MaxVolumes", move |a| {
            Ok(admin::MaxVolumesResponse {
                max_volumes: a.max_volumes(),
            })
        })
        .await
    }

    async fn put_publication(
        &self,
        r: Request<admin::Publication>,
    ) -> Result<Response<admin::Empty>, Status> {
        let p = r.into_inner();
        self.run("PutPublication", move |a| {
            a.put_publication(&wire::publication_from_wire(&p)?)?;
            Ok(admin::Empty {})
        })
        .await
    }

    async fn delete_publication(
        &self,
        r: Request<admin::Publication>,
    ) -> Result<Response<admin::Empty>, Status> {
        let p = r.into_inner();
        self.run("DeletePublication", move |a| {
            let kind: PublicationKind = p.kind.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "publication kind {:?} is not stage or publish",
                    p.kind
                ))
            })?;
            a.delete_publication(&p.volume_id, kind, &p.path)?;
            Ok(admin::Empty {})
        })
        .await
    }

    async fn list_publications(
        &self,
        r: Request<admin::GetVolumeRequest>,
    ) -> Result<Response<admin::ListPublicationsResponse>, Status> {
        let id = r.into_inner().volume_id;
        self.run("ListPublications", move |a| {
            let pubs = a.publications((!id.is_empty()).then_some(id.as_str()))?;
            Ok(admin::ListPublicationsResponse {
                publications: pubs.iter().map(wire::publication_to_wire).collect(),
            })
        })
        .await
    }

    async fn reconcile(
        &self,
        r: Request<admin::ReconcileRequest>,
    ) -> Result<Response<admin::ReconcileReport>, Status> {
        let r = r.into_inner();
        self.run("Reconcile", move |a| {
            Ok(wire::report_to_wire(
                &a.reconcile(r.dry_run, r.remove_orphans)?,
            ))
        })
        .await
    }

    async fn find_device(
        &self,
        r: Request<admin::GetVolumeRequest>,
    ) -> Result<Response<admin::FindDeviceResponse>, Status> {
        let id = r.into_inner().volume_id;
        self.run("FindDevice", move |a| {
            let v = a
                .volume(&id)?
                .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
            let d = a.find_device(&v)?;
            Ok(admin::FindDeviceResponse {
                found: d.is_some(),
                path: d.as_ref().and_then(|d| d.path.clone()).unwrap_or_default(),
                size_bytes: d.map_or(0, |d| d.size.0),
            })
        })
        .await
    }

    async fn ledger_status(
        &self,
        _r: Request<admin::Empty>,
    ) -> Result<Response<admin::LedgerStatusResponse>, Status> {
        self.run("LedgerStatus", move |a| {
            Ok(wire::ledger_status_to_wire(VolumeStore::ledger_status(a)?))
        })
        .await
    }

    async fn rebuild_ledger(
        &self,
        r: Request<admin::RebuildLedgerRequest>,
    ) -> Result<Response<admin::RebuildLedgerResponse>, Status> {
        let apply = r.into_inner().apply;
        self.run("RebuildLedger", move |a| {
            let rep = a.rebuild_ledger(apply)?;
            if apply {
                // The daemon serves from now on: reconcile as at start.
                let rec = a.reconcile(false, false)?;
                tracing::info!(
                    actions = rec.actions.len(),
                    errors = rec.errors.len(),
                    "reconciliation after the ledger rebuild done"
                );
            }
            Ok(wire::rebuild_to_wire(&rep, |v| a.usable_of(v)))
        })
        .await
    }

    async fn forget_region(
        &self,
        r: Request<admin::RegionRequest>,
    ) -> Result<Response<admin::RegionRecoveryResponse>, Status> {
        let region = r.into_inner().region;
        self.run("ForgetRegion", move |a| {
            Ok(wire::recovery_to_wire(&a.forget_region(&region)?))
        })
        .await
    }

    async fn reinit_region(
        &self,
        r: Request<admin::RegionRequest>,
    ) -> Result<Response<admin::RegionRecoveryResponse>, Status> {
        let region = r.into_inner().region;
        self.run("ReinitRegion", move |a| {
            Ok(wire::recovery_to_wire(&a.reinit_region(&region)?))
        })
        .await
    }

    async fn health(
        &self,
        _r: Request<admin::Empty>,
    ) -> Result<Response<admin::HealthResponse>, Status> {
        self.run("Health", move |a| {
            VolumeStore::health(a)?;
            Ok(admin::HealthResponse {
                backend: a.backend().kind().to_owned(),
                describe: a.backend().describe(),
                can_expand: a.backend().can_resize(),
            })
        })
        .await
    }

    async fn erase_status(
        &self,
        _r: Request<admin::Empty>,
    ) -> Result<Response<admin::EraseStatusResponse>, Status> {
        self.run("EraseStatus", move |a| {
            let s = a.erase_stats()?;
            Ok(admin::EraseStatusResponse {
                erasing_volumes: s.volumes,
                pending_bytes: s.pending_bytes,
                erased_bytes_total: s.erased_bytes_total,
            })
        })
        .await
    }
}

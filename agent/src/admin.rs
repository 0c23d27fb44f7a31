//! The admin API (`pmem.admin.v1.Admin`) on its own socket: regions,
//! volumes, reconciliation. Used by `pmemctl` and the tests.

use std::sync::Arc;

use pmem_allocator::{RegionRecovery, Usage};
use pmem_proto::admin;
use pmem_proto::admin::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::csi::node;
use crate::driver::Driver;
use crate::error::{AgentError, invalid};
use crate::mount::host::RealHost;
use crate::rpc::{blocking, call};
use crate::store::VolumeStore;
use crate::wire;

#[derive(Debug, Clone)]
pub struct AdminService {
    driver: Arc<Driver>,
}

impl AdminService {
    pub fn new(driver: Arc<Driver>) -> AdminService {
        AdminService { driver }
    }

    /// ForgetRegion and ReinitRegion: the same request, checks and answer
    /// around a different allocator operation on the named lost region.
    async fn region_recovery(
        &self,
        method: &'static str,
        req: Request<admin::RegionRequest>,
        op: fn(&dyn VolumeStore, &str) -> pmem_allocator::Result<RegionRecovery>,
    ) -> Result<Response<admin::RegionRecoveryResponse>, Status> {
        let d = &self.driver;
        let region = req.into_inner().region;
        let subject = region.clone();
        call(&d.metrics, method, &subject, async move {
            if region.is_empty() {
                return Err(invalid("region is required"));
            }
            let r = blocking(&d.alloc, move |a| op(a, &region)).await?;
            Ok(wire::recovery_to_wire(&r))
        })
        .await
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
            let (caps, kind) = blocking(&d.alloc, |a| {
                Ok((a.capacity(Usage::AppDirect)?, a.backend_info().kind))
            })
            .await?;
            Ok(admin::ListRegionsResponse {
                regions: caps
                    .iter()
                    .map(|c| wire::region_to_wire(c, &kind))
                    .collect(),
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
                    "state {} is not one of creating, ready, deleting, erasing",
                    crate::error::quote(&req.state)
                )));
            }
            if !req.persistency.is_empty()
                && req
                    .persistency
                    .parse::<pmem_allocator::Persistency>()
                    .is_err()
            {
                return Err(invalid(format!(
                    "persistency {} is not persistent or ephemeral",
                    crate::error::quote(&req.persistency)
                )));
            }
            let state = req.state.parse::<pmem_allocator::VolumeState>().ok();
            let persistency = req.persistency.parse::<pmem_allocator::Persistency>().ok();
            let volumes = blocking(&d.alloc, move |a| {
                let pubs = a.publications(None)?;
                let mut out = Vec::new();
                for v in a.volumes_where(state, persistency)? {
                    // A volume deleted since the listing (pmem-allocd answers
                    // usable bytes per call) is simply no longer listed.
                    let usable = match a.usable_of(&v) {
                        Err(pmem_allocator::Error::NotFound(_)) => continue,
                        u => u?,
                    };
                    out.push(wire::volume_to_wire(
                        &v,
                        usable,
                        wire::publications_of(&pubs, &v.id),
                    ));
                }
                Ok(out)
            })
            .await?;
            Ok(admin::ListVolumesResponse { volumes })
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
            let v = blocking(&d.alloc, move |a| {
                let Some(v) = a.volume(&lookup)? else {
                    return Ok(None);
                };
                let pubs = a.publications(Some(&lookup))?;
                Ok(Some(wire::volume_to_wire(&v, a.usable_of(&v)?, &pubs)))
            })
            .await?;
            v.ok_or_else(|| AgentError::NotFound(format!("volume {id} does not exist")))
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
            let mut w = wire::report_to_wire(&rep);
            // pmemctl prints actions; show failed steps there too.
            w.actions
                .extend(rep.errors.iter().map(|e| format!("error: {e}")));
            // The node's share: mounts without records, unused inline volumes.
            let host = RealHost::new();
            let scan = node::scan_mounts(d, &host, req.dry_run).await;
            let collected = node::collect_ephemeral(d, &host, req.dry_run).await;
            w.actions.extend(scan.recorded);
            w.actions.extend(collected.deleted);
            w.errors.extend(collected.pending.iter().cloned());
            w.actions
                .extend(collected.pending.iter().map(|e| format!("error: {e}")));
            if !collected.pending.is_empty() {
                d.node_reconcile.kick();
            }
            w.unrecorded_mounts = scan.unrecorded;
            w.node_history = d.node_reconcile.history();
            Ok(w)
        })
        .await
    }

    async fn ledger_status(
        &self,
        _req: Request<admin::Empty>,
    ) -> Result<Response<admin::LedgerStatusResponse>, Status> {
        let d = &self.driver;
        call(&d.metrics, "admin.LedgerStatus", "", async {
            let s = blocking(&d.alloc, |a| a.ledger_status()).await?;
            Ok(wire::ledger_status_to_wire(s))
        })
        .await
    }

    async fn rebuild_ledger(
        &self,
        req: Request<admin::RebuildLedgerRequest>,
    ) -> Result<Response<admin::RebuildLedgerResponse>, Status> {
        let d = &self.driver;
        let apply = req.into_inner().apply;
        call(&d.metrics, "admin.RebuildLedger", "", async move {
            let w = blocking(&d.alloc, move |a| {
                let rep = a.rebuild_ledger(apply)?;
                Ok(wire::rebuild_to_wire(&rep, |v| {
                    a.usable_of(v).unwrap_or(v.size)
                }))
            })
            .await?;
            if w.applied {
                // The ledger is accepted now: finish the start-up it skipped.
                crate::server::finish_startup(d)
                    .await
                    .map_err(|e| AgentError::Internal(format!("{e:#}")))?;
                tracing::warn!(
                    volumes = w.volumes.len(),
                    "recovery done: the ledger was rebuilt and the daemon serves CSI"
                );
            }
            Ok(w)
        })
        .await
    }

    async fn forget_region(
        &self,
        req: Request<admin::RegionRequest>,
    ) -> Result<Response<admin::RegionRecoveryResponse>, Status> {
        self.region_recovery("admin.ForgetRegion", req, |a, r| a.forget_region(r))
            .await
    }

    async fn reinit_region(
        &self,
        req: Request<admin::RegionRequest>,
    ) -> Result<Response<admin::RegionRecoveryResponse>, Status> {
        self.region_recovery("admin.ReinitRegion", req, |a, r| a.reinit_region(r))
            .await
    }
}

//! Where the agent keeps volumes: the allocator embedded in this process
//! (the default), or a separate `pmem-allocd` reached over its unix socket
//! (`--allocator unix://PATH`), for nodes where the CSI plugin runs in a
//! container but the ledger and device work stay on the host.
//!
//! The trait is synchronous like the allocator itself: callers run it on the
//! blocking pool (`rpc::blocking`); the remote implementation drives its
//! gRPC client from there with `Handle::block_on`.

use std::fmt::Debug;
use std::sync::Arc;

use std::collections::BTreeMap;

use pmem_allocator::{
    Allocator, Bytes, CreateRequest, Device, DeviceRequest, EraseStats, Error, Persistency,
    Publication, PublicationKind, RebuildReport, ReconcileReport, RegionCapacity, RegionRecovery,
    Result, Usage, Volume, VolumePage, VolumeState,
};
use pmem_proto::admin;
use pmem_proto::admin::allocator_client::AllocatorClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;

use crate::wire;

/// The device backend behind a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// `sim`, `direct` or `lvm`.
    pub kind: String,
    /// Volumes can grow (the backend resizes devices).
    pub can_expand: bool,
}

/// The ledger's identity and whether it serves (allocator `identity.rs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerStatus {
    pub ledger_id: String,
    /// Why the ledger is refused, with how to recover; `None` when serving.
    pub refused: Option<String>,
    /// Lost regions with why.
    pub lost: BTreeMap<String, String>,
}

pub trait VolumeStore: Send + Sync + Debug {
    /// What the device backend is and can do.
    fn backend_info(&self) -> BackendInfo;
    /// Ledger and backend answer.
    fn health(&self) -> Result<()>;
    fn create_volume(&self, req: &CreateRequest) -> Result<Volume>;
    fn delete_volume(&self, id: &str) -> Result<()>;
    fn expand_volume(&self, id: &str, required: Bytes, limit: Option<Bytes>) -> Result<Volume>;
    fn volume(&self, id: &str) -> Result<Option<Volume>>;
    fn volume_by_name(&self, name: &str) -> Result<Option<Volume>>;
    fn volumes(&self) -> Result<Vec<Volume>>;
    /// Volumes in `state` of `persistency` (`None`: any).
    fn volumes_where(
        &self,
        state: Option<VolumeState>,
        persistency: Option<Persistency>,
    ) -> Result<Vec<Volume>>;
    /// One page of the volumes the CO sees, after the one with `seq` `after`
    /// (0: from the start), at most `max` (0: all), with usable bytes: one
    /// call per page, costing the page, not the ledger.
    fn live_volumes_page(&self, after: i64, max: usize) -> Result<VolumePage>;
    /// Capacity with each region's extent map and holders (admin view).
    fn capacity(&self, usage: Usage) -> Result<Vec<RegionCapacity>>;
    /// Capacity without extents from the allocator's memory: O(regions),
    /// no ledger read (GetCapacity, metrics).
    fn capacity_summary(&self, usage: Usage) -> Result<Vec<RegionCapacity>>;
    /// The capacity summary and max_volumes at once without blocking, when
    /// the store can answer in place (the embedded allocator whose state is
    /// not held right now); `None`: use the blocking calls.
    fn try_capacity_summary(&self, _usage: Usage) -> Option<(Vec<RegionCapacity>, u64)> {
        None
    }
    /// Volumes by state and persistency (metrics), without counting rows.
    fn volume_counts(&self) -> Result<Vec<(VolumeState, Persistency, u64)>>;
    fn max_volumes(&self) -> Result<u64>;
    /// Usable device bytes of a volume (after backend metadata).
    fn usable_of(&self, v: &Volume) -> Result<Bytes>;
    fn put_publication(&self, p: &Publication) -> Result<()>;
    fn delete_publication(&self, volume_id: &str, kind: PublicationKind, path: &str) -> Result<()>;
    fn publications(&self, volume_id: Option<&str>) -> Result<Vec<Publication>>;
    fn reconcile(&self, dry_run: bool, remove_orphans: bool) -> Result<ReconcileReport>;
    /// The volume's device as the backend finds it now.
    fn find_device(&self, v: &Volume) -> Result<Option<Device>>;
    fn ledger_status(&self) -> Result<LedgerStatus>;
    /// Only for a refused ledger; a dry run unless `apply`.
    fn rebuild_ledger(&self, apply: bool) -> Result<RebuildReport>;
    /// Only for a lost region.
    fn forget_region(&self, region: &str) -> Result<RegionRecovery>;
    /// Only for a lost region.
    fn reinit_region(&self, region: &str) -> Result<RegionRecovery>;
    /// The background eraser's backlog and progress.
    fn erase_stats(&self) -> Result<EraseStats>;
}

fn device_request(v: &Volume) -> DeviceRequest {
    DeviceRequest {
        volume_id: v.id.clone(),
        region: v.region.clone(),
        offset: v.offset,
        size: v.size,
        usage: v.usage,
    }
}

impl VolumeStore for Allocator {
    fn backend_info(&self) -> BackendInfo {
        BackendInfo {
            kind: self.backend().kind().to_owned(),
            can_expand: self.backend().can_resize(),
        }
    }

    fn health(&self) -> Result<()> {
        self.volume("health-probe")?;
        self.backend().regions()?;
        Ok(())
    }

    fn create_volume(&self, req: &CreateRequest) -> Result<Volume> {
        Allocator::create_volume(self, req)
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        Allocator::delete_volume(self, id)
    }

    fn expand_volume(&self, id: &str, required: Bytes, limit: Option<Bytes>) -> Result<Volume> {
        Allocator::expand_volume(self, id, required, limit)
    }

    fn volume(&self, id: &str) -> Result<Option<Volume>> {
        Allocator::volume(self, id)
    }

    fn volume_by_name(&self, name: &str) -> Result<Option<Volume>> {
        Allocator::volume_by_name(self, name)
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        Allocator::volumes(self)
    }

    fn volumes_where(
        &self,
        state: Option<VolumeState>,
        persistency: Option<Persistency>,
    ) -> Result<Vec<Volume>> {
        Allocator::volumes_where(self, state, persistency)
    }

    fn live_volumes_page(&self, after: i64, max: usize) -> Result<VolumePage> {
        Allocator::live_volumes_page(self, after, max)
    }

    fn capacity(&self, usage: Usage) -> Result<Vec<RegionCapacity>> {
        Allocator::capacity(self, usage)
    }

    fn capacity_summary(&self, usage: Usage) -> Result<Vec<RegionCapacity>> {
        Ok(Allocator::capacity_summary(self, usage))
    }

    fn try_capacity_summary(&self, usage: Usage) -> Option<(Vec<RegionCapacity>, u64)> {
        Allocator::try_capacity_summary(self, usage)
    }

    fn volume_counts(&self) -> Result<Vec<(VolumeState, Persistency, u64)>> {
        Allocator::volume_counts(self)
    }

    fn max_volumes(&self) -> Result<u64> {
        Ok(Allocator::max_volumes(self))
    }

    fn usable_of(&self, v: &Volume) -> Result<Bytes> {
        Ok(Allocator::usable_of(self, v))
    }

    fn put_publication(&self, p: &Publication) -> Result<()> {
        Allocator::put_publication(self, p)
    }

    fn delete_publication(&self, volume_id: &str, kind: PublicationKind, path: &str) -> Result<()> {
        Allocator::delete_publication(self, volume_id, kind, path)
    }

    fn publications(&self, volume_id: Option<&str>) -> Result<Vec<Publication>> {
        Allocator::publications(self, volume_id)
    }

    fn reconcile(&self, dry_run: bool, remove_orphans: bool) -> Result<ReconcileReport> {
        Allocator::reconcile(self, dry_run, remove_orphans)
    }

    fn find_device(&self, v: &Volume) -> Result<Option<Device>> {
        self.backend().find(&device_request(v))
    }

    fn ledger_status(&self) -> Result<LedgerStatus> {
        Ok(LedgerStatus {
            ledger_id: self.ledger_id()?,
            refused: self.refusal(),
            lost: self.lost_regions(),
        })
    }

    fn rebuild_ledger(&self, apply: bool) -> Result<RebuildReport> {
        Allocator::rebuild_ledger(self, apply)
    }

    fn forget_region(&self, region: &str) -> Result<RegionRecovery> {
        Allocator::forget_region(self, region)
    }

    fn reinit_region(&self, region: &str) -> Result<RegionRecovery> {
        Allocator::reinit_region(self, region)
    }

    fn erase_stats(&self) -> Result<EraseStats> {
        Allocator::erase_stats(self)
    }
}

/// The allocator in a `pmem-allocd` daemon.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    client: AllocatorClient<Channel>,
    handle: Handle,
    endpoint: String,
}

impl RemoteStore {
    /// Connects (from async context) to `unix:///path`.
    pub async fn connect(endpoint: &str) -> Result<RemoteStore> {
        let ch = crate::client::connect(endpoint)
            .await
            .map_err(|e| Error::Unavailable(format!("allocator {endpoint}: {e}")))?;
        Ok(RemoteStore {
            client: AllocatorClient::new(ch),
            handle: Handle::current(),
            endpoint: endpoint.to_owned(),
        })
    }

    /// Runs one call; must be on a blocking thread, never an async one.
    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(AllocatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let c = self.client.clone();
        self.handle
            .block_on(f(c))
            .map(tonic::Response::into_inner)
            .map_err(|s| wire::status_to_error(&s))
    }

    fn get(&self, id: &str) -> Result<Option<admin::Volume>> {
        let req = admin::GetVolumeRequest {
            volume_id: id.to_owned(),
        };
        match self.call(|mut c| async move { c.get_volume(req).await }) {
            Ok(v) => Ok(Some(v)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl VolumeStore for RemoteStore {
    fn backend_info(&self) -> BackendInfo {
        match self.call(|mut c| async move { c.health(admin::Empty {}).await }) {
            Ok(h) => BackendInfo {
                kind: h.backend,
                can_expand: h.can_expand,
            },
            Err(_) => BackendInfo {
                kind: "remote".to_owned(),
                can_expand: false,
            },
        }
    }

    fn health(&self) -> Result<()> {
        self.call(|mut c| async move { c.health(admin::Empty {}).await })
            .map(|_| ())
    }

    fn create_volume(&self, req: &CreateRequest) -> Result<Volume> {
        let w = admin::AllocCreateRequest {
            name: req.name.clone(),
            required_bytes: req.required.0,
            limit_bytes: req.limit.map_or(0, |l| l.0),
            usage: req.usage.as_str().to_owned(),
            erase_after: req.erase_after,
            parameters: req.parameters.clone().into_iter().collect(),
            persistency: req.persistency.as_str().to_owned(),
            context: req.context.clone().into_iter().collect(),
            region: req.region.clone().unwrap_or_default(),
        };
        let v = self.call(|mut c| async move { c.create_volume(w).await })?;
        wire::volume_from_wire(&v)
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        let req = admin::GetVolumeRequest {
            volume_id: id.to_owned(),
        };
        self.call(|mut c| async move { c.delete_volume(req).await })
            .map(|_| ())
    }

    fn expand_volume(&self, id: &str, required: Bytes, limit: Option<Bytes>) -> Result<Volume> {
        let req = admin::AllocExpandRequest {
            volume_id: id.to_owned(),
            required_bytes: required.0,
            limit_bytes: limit.map_or(0, |l| l.0),
        };
        let v = self.call(|mut c| async move { c.expand_volume(req).await })?;
        wire::volume_from_wire(&v)
    }

    fn volume(&self, id: &str) -> Result<Option<Volume>> {
        self.get(id)?
            .map(|v| wire::volume_from_wire(&v))
            .transpose()
    }

    fn volume_by_name(&self, name: &str) -> Result<Option<Volume>> {
        let req = admin::GetVolumeByNameRequest {
            name: name.to_owned(),
        };
        match self.call(|mut c| async move { c.get_volume_by_name(req).await }) {
            Ok(v) => wire::volume_from_wire(&v).map(Some),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        let r = self.call(|mut c| async move {
            c.list_volumes(admin::ListVolumesRequest::default()).await
        })?;
        r.volumes.iter().map(wire::volume_from_wire).collect()
    }

    fn volumes_where(
        &self,
        state: Option<VolumeState>,
        persistency: Option<Persistency>,
    ) -> Result<Vec<Volume>> {
        let req = admin::ListVolumesRequest {
            state: state.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            persistency: persistency
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
        };
        let r = self.call(|mut c| async move { c.list_volumes(req).await })?;
        r.volumes.iter().map(wire::volume_from_wire).collect()
    }

    fn live_volumes_page(&self, after: i64, max: usize) -> Result<VolumePage> {
        let req = admin::VolumePageRequest {
            after_seq: after,
            max_entries: u32::try_from(max).unwrap_or(u32::MAX),
        };
        let r = self.call(|mut c| async move { c.list_volume_page(req).await })?;
        wire::page_from_wire(r)
    }

    fn capacity(&self, usage: Usage) -> Result<Vec<RegionCapacity>> {
        let req = admin::CapacityRequest {
            usage: usage.as_str().to_owned(),
        };
        let r = self.call(|mut c| async move { c.capacity(req).await })?;
        r.regions.iter().map(wire::region_from_wire).collect()
    }

    fn capacity_summary(&self, usage: Usage) -> Result<Vec<RegionCapacity>> {
        let req = admin::CapacityRequest {
            usage: usage.as_str().to_owned(),
        };
        let r = self.call(|mut c| async move { c.capacity_summary(req).await })?;
        r.regions.iter().map(wire::region_from_wire).collect()
    }

    fn volume_counts(&self) -> Result<Vec<(VolumeState, Persistency, u64)>> {
        let r = self.call(|mut c| async move { c.volume_counts(admin::Empty {}).await })?;
        wire::counts_from_wire(&r)
    }

    fn max_volumes(&self) -> Result<u64> {
        self.call(|mut c| async move { c.max_volumes(admin::Empty {}).await })
            .map(|r| r.max_volumes)
    }

    fn usable_of(&self, v: &Volume) -> Result<Bytes> {
        match self.get(&v.id)? {
            Some(w) => Ok(Bytes(w.usable_bytes)),
            None => Err(Error::NotFound(format!("volume {} does not exist", v.id))),
        }
    }

    fn put_publication(&self, p: &Publication) -> Result<()> {
        let w = wire::publication_to_wire(p);
        self.call(|mut c| async move { c.put_publication(w).await })
            .map(|_| ())
    }

    fn delete_publication(&self, volume_id: &str, kind: PublicationKind, path: &str) -> Result<()> {
        let w = admin::Publication {
            kind: kind.as_str().to_owned(),
            path: path.to_owned(),
            readonly: false,
            volume_id: volume_id.to_owned(),
            capability: String::new(),
            device: 0,
        };
        self.call(|mut c| async move { c.delete_publication(w).await })
            .map(|_| ())
    }

    fn publications(&self, volume_id: Option<&str>) -> Result<Vec<Publication>> {
        let req = admin::GetVolumeRequest {
            volume_id: volume_id.unwrap_or_default().to_owned(),
        };
        let r = self.call(|mut c| async move { c.list_publications(req).await })?;
        r.publications
            .iter()
            .map(wire::publication_from_wire)
            .collect()
    }

    fn reconcile(&self, dry_run: bool, remove_orphans: bool) -> Result<ReconcileReport> {
        let req = admin::ReconcileRequest {
            dry_run,
            remove_orphans,
        };
        let r = self.call(|mut c| async move { c.reconcile(req).await })?;
        Ok(wire::report_from_wire(&r))
    }

    fn find_device(&self, v: &Volume) -> Result<Option<Device>> {
        let req = admin::GetVolumeRequest {
            volume_id: v.id.clone(),
        };
        let r = self.call(|mut c| async move { c.find_device(req).await })?;
        Ok(r.found.then(|| Device {
            path: (!r.path.is_empty()).then_some(r.path),
            size: Bytes(r.size_bytes),
        }))
    }

    fn ledger_status(&self) -> Result<LedgerStatus> {
        let r = self.call(|mut c| async move { c.ledger_status(admin::Empty {}).await })?;
        Ok(wire::ledger_status_from_wire(r))
    }

    fn rebuild_ledger(&self, apply: bool) -> Result<RebuildReport> {
        let req = admin::RebuildLedgerRequest { apply };
        let r = self.call(|mut c| async move { c.rebuild_ledger(req).await })?;
        wire::rebuild_from_wire(&r)
    }

    fn forget_region(&self, region: &str) -> Result<RegionRecovery> {
        let req = admin::RegionRequest {
            region: region.to_owned(),
        };
        let r = self.call(|mut c| async move { c.forget_region(req).await })?;
        wire::recovery_from_wire(&r)
    }

    fn reinit_region(&self, region: &str) -> Result<RegionRecovery> {
        let req = admin::RegionRequest {
            region: region.to_owned(),
        };
        let r = self.call(|mut c| async move { c.reinit_region(req).await })?;
        wire::recovery_from_wire(&r)
    }

    fn erase_stats(&self) -> Result<EraseStats> {
        let r = self.call(|mut c| async move { c.erase_status(admin::Empty {}).await })?;
        Ok(EraseStats {
            volumes: r.erasing_volumes,
            pending_bytes: r.pending_bytes,
            erased_bytes_total: r.erased_bytes_total,
        })
    }
}

/// A shared store.
pub type Store = Arc<dyn VolumeStore>;

//! CSI Controller service, node-scoped: it provisions only on this node
//! (external-provisioner `--node-deployment`).

use std::collections::HashMap;
use std::sync::Arc;

use pmem_allocator::{Bytes, CreateRequest, Persistency, Volume, VolumeState};
use pmem_proto::csi;
use pmem_proto::csi::controller_server::Controller;
use pmem_proto::csi::controller_service_capability::{self, rpc};
use tonic::{Request, Response, Status};

use crate::csi::params::{
    Access, NAME_MAX, apply_fs_minimum, check_accessibility, check_id, check_len, check_map,
    fs_minimum, node_topology, parse_capabilities, parse_parameters, parse_range, topology_matches,
};
use crate::driver::Driver;
use crate::error::{AgentError, AgentResult, invalid};
use crate::rpc::{blocking, call};

/// The RPCs we implement and advertise; everything else is Unimplemented.
const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::CreateDeleteVolume,
    rpc::Type::ListVolumes,
    rpc::Type::GetCapacity,
    rpc::Type::GetVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::ExpandVolume,
];

#[derive(Debug, Clone)]
pub struct ControllerService {
    driver: Arc<Driver>,
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> ControllerService {
        ControllerService { driver }
    }
}

/// Volume context handed to the node calls.
pub fn volume_context(v: &Volume) -> HashMap<String, String> {
    HashMap::from([
        ("usage".to_owned(), v.usage.as_str().to_owned()),
        ("eraseAfter".to_owned(), v.erase_after.to_string()),
        ("region".to_owned(), v.region.clone()),
    ])
}

/// A volume as the CO may see it. One deleted but still being erased in the
/// background (`erasing`, its row renamed) is gone: DeleteVolume returned
/// for it. The admin API keeps showing it to the operator.
fn live(v: Option<Volume>) -> Option<Volume> {
    v.filter(|v| v.state != VolumeState::Erasing)
}

fn gone(id: &str) -> pmem_allocator::Error {
    pmem_allocator::Error::NotFound(format!("volume {id} does not exist"))
}

fn to_i64(b: Bytes) -> i64 {
    i64::try_from(b.0).unwrap_or(i64::MAX)
}

impl ControllerService {
    /// An RPC we do not support (and do not advertise), logged like any call.
    async fn refuse<T>(&self, method: &'static str, what: &str) -> Result<Response<T>, Status> {
        let msg = format!("{what} is not supported by pmem-agent");
        call(&self.driver.metrics, method, "", async {
            Err(AgentError::Unimplemented(msg))
        })
        .await
    }

    fn csi_volume(&self, v: &Volume, usable: Bytes) -> csi::Volume {
        csi::Volume {
            capacity_bytes: to_i64(usable),
            volume_id: v.id.clone(),
            volume_context: volume_context(v),
            content_source: None,
            accessible_topology: vec![node_topology(&self.driver.cfg.node_id)],
        }
    }

    async fn create(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> AgentResult<csi::CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(invalid("name is required"));
        }
        check_len("name", &req.name, NAME_MAX)?;
        let (required, limit) = parse_range("capacity_range", req.capacity_range.as_ref())?;
        let caps = parse_capabilities("volume_capabilities", &req.volume_capabilities)?;
        let params = parse_parameters(&req.parameters)?;
        // The filesystem is known now: a volume too small for it would be
        // accepted here and then fail every NodeStageVolume.
        let required = apply_fs_minimum(&caps, required, limit)?;
        if req.volume_content_source.is_some() {
            return Err(invalid(
                "volume_content_source is not supported: pmem-agent has no snapshots or clones",
            ));
        }
        if !req.mutable_parameters.is_empty() {
            return Err(invalid(
                "mutable_parameters are not supported (no MODIFY_VOLUME)",
            ));
        }
        check_accessibility(
            req.accessibility_requirements.as_ref(),
            &self.driver.cfg.node_id,
        )
        .map_err(AgentError::ResourceExhausted)?;
        let creq = CreateRequest {
            name: req.name.clone(),
            required,
            limit,
            usage: params.usage,
            erase_after: params.erase_after,
            parameters: params.stored,
            persistency: Persistency::Persistent,
            context: Default::default(),
            region: None,
        };
        let (v, usable) = blocking(&self.driver.alloc, move |a| {
            let v = a.create_volume(&creq)?;
            let usable = a.usable_of(&v)?;
            Ok((v, usable))
        })
        .await?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(self.csi_volume(&v, usable)),
        })
    }

    async fn delete(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> AgentResult<csi::DeleteVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        let mut lock = self.driver.lock_volume(&req.volume_id)?;
        let id = req.volume_id.clone();
        let found = blocking(&self.driver.alloc, move |a| {
            let Some(v) = a.volume(&id)? else {
                return Ok(None);
            };
            let pubs = a.publications(Some(&id))?;
            Ok(Some((v, pubs)))
        })
        .await?;
        let Some((v, pubs)) = found else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if v.persistency == Persistency::Ephemeral {
            // The kubelet addresses inline volumes by name.
            lock.also(&v.name)?;
        }
        // Under the volume's lock no node call can be between its mount and
        // its record: the ledger's publications are the whole truth.
        if !pubs.is_empty() {
            let at: Vec<String> = pubs
                .iter()
                .map(|p| format!("{} at {}", p.kind.as_str(), p.path))
                .collect();
            return Err(AgentError::FailedPrecondition(format!(
                "volume {} is still in use ({}); unpublish and unstage it first",
                v.id,
                at.join(", ")
            )));
        }
        let id = req.volume_id.clone();
        blocking(&self.driver.alloc, move |a| a.delete_volume(&id)).await?;
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> AgentResult<csi::ValidateVolumeCapabilitiesResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_map("volume_context", &req.volume_context)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let id = req.volume_id.clone();
        let v = blocking(&self.driver.alloc, move |a| a.volume(&id).map(live)).await?;
        let v = v.ok_or_else(|| {
            AgentError::NotFound(format!("volume {} does not exist", req.volume_id))
        })?;
        let mut problems = Vec::new();
        if let Err(e) = parse_capabilities("volume_capabilities", &req.volume_capabilities) {
            problems.push(e.to_string());
        }
        match parse_parameters(&req.parameters) {
            Ok(p) if p.usage != v.usage || p.erase_after != v.erase_after => problems.push(format!(
                "parameters ask for usage={} eraseAfter={} but the volume has usage={} eraseAfter={}",
                p.usage, p.erase_after, v.usage, v.erase_after
            )),
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
        if problems.is_empty() {
            Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            })
        } else {
            Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            })
        }
    }

    async fn list(&self, req: csi::ListVolumesRequest) -> AgentResult<csi::ListVolumesResponse> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| invalid(format!("max_entries {} is negative", req.max_entries)))?;
        let token = if req.starting_token.is_empty() {
            None
        } else {
            Some(PageToken::parse(&req.starting_token)?)
        };
        let after = token.as_ref().map_or(0, |t| t.after);
        // One store call per page (with pmem-allocd: one round trip).
        let page = blocking(&self.driver.alloc, move |a| a.live_volumes_page(after, max)).await?;
        if let Some(t) = &token
            && t.ledger != page.ledger_id
        {
            return Err(AgentError::Aborted(format!(
                "starting_token {} was issued by another ledger (not {}); list again from the start",
                crate::error::quote(&req.starting_token),
                page.ledger_id
            )));
        }
        let next_token = match page.entries.last() {
            Some(last) if page.more => PageToken {
                ledger: page.ledger_id.clone(),
                after: last.volume.seq,
            }
            .encode(),
            _ => String::new(),
        };
        let entries = page
            .entries
            .iter()
            .map(|e| csi::list_volumes_response::Entry {
                volume: Some(self.csi_volume(&e.volume, e.usable)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(match &e.lost {
                        Some(why) => condition_lost(&e.volume, why),
                        None => condition_of_state(&e.volume),
                    }),
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> AgentResult<csi::ControllerGetVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        let id = req.volume_id.clone();
        let found = blocking(&self.driver.alloc, move |a| {
            let Some(v) = live(a.volume(&id)?) else {
                return Ok(None);
            };
            let usable = a.usable_of(&v)?;
            if let Some(why) = a.ledger_status()?.lost.get(&v.region) {
                return Ok(Some((v, usable, None, Some(why.clone()))));
            }
            let found = a.find_device(&v);
            Ok(Some((v, usable, Some(found), None)))
        })
        .await?;
        let (v, usable, found, lost) = found.ok_or_else(|| {
            AgentError::NotFound(format!("volume {} does not exist", req.volume_id))
        })?;
        let condition = match found {
            _ if lost.is_some() => condition_lost(&v, lost.as_deref().unwrap_or_default()),
            _ if v.state != VolumeState::Ready => condition_of_state(&v),
            Some(Ok(Some(_))) => csi::VolumeCondition {
                abnormal: false,
                message: "device present".into(),
            },
            Some(Ok(None)) => csi::VolumeCondition {
                abnormal: true,
                message: format!(
                    "device of volume {} in region {} is missing",
                    v.id, v.region
                ),
            },
            Some(Err(e)) => csi::VolumeCondition {
                abnormal: true,
                message: format!("cannot check device of volume {}: {e}", v.id),
            },
            None => condition_of_state(&v),
        };
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(&v, usable)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition),
            }),
        })
    }

    async fn capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> AgentResult<csi::GetCapacityResponse> {
        let caps = req
            .volume_capabilities
            .iter()
            .enumerate()
            .map(|(i, c)| {
                crate::csi::params::parse_capability(&format!("volume_capabilities[{i}]"), c)
            })
            .collect::<AgentResult<Vec<_>>>()?;
        let params = parse_parameters(&req.parameters)?;
        if let Some(t) = &req.accessible_topology
            && !topology_matches(t, &self.driver.cfg.node_id)
        {
            return Ok(csi::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: Some(0),
            });
        }
        let usage = params.usage;
        let wanted = caps;
        // From the allocator's memory: no ledger read, no extent map; in
        // place when the embedded allocator's state is free (O(regions)).
        let caps = match self.driver.alloc.try_capacity_summary(usage) {
            Some((caps, _)) => caps,
            None => blocking(&self.driver.alloc, move |a| a.capacity_summary(usage)).await?,
        };
        let available = caps.iter().map(|c| c.available.0).sum::<u64>();
        let max = caps.iter().map(|c| c.largest).max().unwrap_or_default();
        let min = caps.iter().map(|c| c.minimum).min().unwrap_or_default();
        // A volume for these capabilities holds at least their filesystem.
        let min = match fs_minimum(&wanted) {
            Some((_, fs_min)) => min.max(Bytes(fs_min)),
            None => min,
        };
        // A CreateVolume of `maximum_volume_size` must succeed: when no
        // hole holds the filesystem's minimum, nothing of these
        // capabilities fits.
        let max = if max < min { Bytes(0) } else { max };
        Ok(csi::GetCapacityResponse {
            available_capacity: to_i64(Bytes(available)),
            maximum_volume_size: Some(to_i64(max)),
            minimum_volume_size: Some(to_i64(min)),
        })
    }

    async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> AgentResult<csi::ControllerExpandVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        if req.capacity_range.is_none() {
            return Err(invalid("capacity_range is required"));
        }
        let (required, limit) = parse_range("capacity_range", req.capacity_range.as_ref())?;
        let block = match &req.volume_capability {
            Some(c) => {
                crate::csi::params::parse_capability("volume_capability", c)?.access
                    == Access::Block
            }
            None => false,
        };
        let _lock = self.driver.lock_volume(&req.volume_id)?;
        let id = req.volume_id.clone();
        let usable = blocking(&self.driver.alloc, move |a| {
            // Under the volume's lock: it cannot start erasing meanwhile.
            if live(a.volume(&id)?).is_none() {
                return Err(gone(&id));
            }
            let v = a.expand_volume(&id, required, limit)?;
            a.usable_of(&v)
        })
        .await?;
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(usable),
            node_expansion_required: !block,
        })
    }
}

/// A ListVolumes page token: the last volume's `seq` (the keyset the next
/// page continues after, whether or not that volume still exists) and the
/// ledger that issued it. Opaque to the CO: `v1.<ledger id>.<seq>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageToken {
    ledger: String,
    after: i64,
}

impl PageToken {
    const VERSION: &'static str = "v1";

    fn encode(&self) -> String {
        format!("{}.{}.{}", Self::VERSION, self.ledger, self.after)
    }

    /// Aborted (the CSI code for a token this plugin cannot continue from)
    /// for anything it did not issue.
    fn parse(token: &str) -> AgentResult<PageToken> {
        let bad = || {
            AgentError::Aborted(format!(
                "starting_token {} is not a token this plugin issued",
                crate::error::quote(token)
            ))
        };
        let mut parts = token.split('.');
        let (Some(version), Some(ledger), Some(after), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let after: i64 = after.parse().map_err(|_| bad())?;
        if version != Self::VERSION
            || ledger.len() != 32
            || !ledger.bytes().all(|b| b.is_ascii_hexdigit())
            || after <= 0
        {
            return Err(bad());
        }
        Ok(PageToken {
            ledger: ledger.to_owned(),
            after,
        })
    }
}

/// A volume on a lost region (its identity missing or another ledger's).
fn condition_lost(v: &Volume, why: &str) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: true,
        message: format!(
            "volume {} is lost: its region {} {why}; an operator must run `pmemctl region forget {}` or `pmemctl region reinit {}`",
            v.id, v.region, v.region, v.region
        ),
    }
}

fn condition_of_state(v: &Volume) -> csi::VolumeCondition {
    match v.state {
        VolumeState::Ready => csi::VolumeCondition {
            abnormal: false,
            message: "ready".into(),
        },
        s => csi::VolumeCondition {
            abnormal: true,
            message: format!("volume {} is {s}", v.id),
        },
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        call(
            &self.driver.metrics,
            "CreateVolume",
            &name,
            self.create(req),
        )
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "DeleteVolume", &id, self.delete(req)).await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        self.refuse(
            "ControllerPublishVolume",
            "ControllerPublishVolume (volumes are node-local; attachRequired is false)",
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.refuse(
            "ControllerUnpublishVolume",
            "ControllerUnpublishVolume (volumes are node-local; attachRequired is false)",
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(
            &self.driver.metrics,
            "ValidateVolumeCapabilities",
            &id,
            self.validate(req),
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        call(
            &self.driver.metrics,
            "ListVolumes",
            "",
            self.list(request.into_inner()),
        )
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        call(
            &self.driver.metrics,
            "GetCapacity",
            "",
            self.capacity(request.into_inner()),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        call(
            &self.driver.metrics,
            "ControllerGetCapabilities",
            "",
            async {
                Ok(csi::ControllerGetCapabilitiesResponse {
                    capabilities: CAPABILITIES
                        .iter()
                        .filter(|t| self.driver.can_expand || **t != rpc::Type::ExpandVolume)
                        .map(|t| csi::ControllerServiceCapability {
                            r#type: Some(controller_service_capability::Type::Rpc(
                                controller_service_capability::Rpc { r#type: *t as i32 },
                            )),
                        })
                        .collect(),
                })
            },
        )
        .await
    }

    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        self.refuse("CreateSnapshot", "CreateSnapshot").await
    }

    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.refuse("DeleteSnapshot", "DeleteSnapshot").await
    }

    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        self.refuse("ListSnapshots", "ListSnapshots").await
    }

    async fn get_snapshot(
        &self,
        _request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        self.refuse("GetSnapshot", "GetSnapshot").await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        if !self.driver.can_expand {
            let what = format!(
                "ControllerExpandVolume with the {} backend",
                self.driver.backend
            );
            return self.refuse("ControllerExpandVolume", &what).await;
        }
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(
            &self.driver.metrics,
            "ControllerExpandVolume",
            &id,
            self.expand(req),
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(
            &self.driver.metrics,
            "ControllerGetVolume",
            &id,
            self.get_volume(req),
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        self.refuse("ControllerModifyVolume", "ControllerModifyVolume")
            .await
    }
}

//! The cases, in the upstream suite's order. Each one sends the requests the
//! upstream spec it stands for sends and checks the same codes in the same
//! order (see cases.tsv for the mapping). Written from the CSI spec and the
//! list of upstream cases; no upstream code.

use std::future::Future;
use std::pin::Pin;

use pmem_proto::csi;
use pmem_proto::csi::controller_service_capability::rpc::Type as CtlCap;
use pmem_proto::csi::node_service_capability::rpc::Type as NodeCap;
use pmem_proto::csi::plugin_capability::service::Type as PluginCap;
use pmem_proto::csi::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::ctx::{
    Ctx, INVALID_VOLUME_ID, Need, Step, Stop, expect_code, fake_node_id, fake_volume_id, must,
    unique, unique_len,
};
use crate::ensure;

pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = Step> + 'a>>;

/// When a case runs.
#[derive(Debug, Clone, Copy)]
pub enum Gate {
    /// The driver advertises the capability.
    Has(Need),
    /// The driver does not advertise it (the case checks Unimplemented).
    Lacks(Need),
}

pub struct Case {
    pub id: &'static str,
    pub gates: Vec<Gate>,
    pub run: for<'a> fn(&'a Ctx) -> CaseFuture<'a>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("id", &self.id)
            .field("gates", &self.gates)
            .finish()
    }
}

/// The longest volume name the suite asks a driver to accept.
const MAX_NAME_LEN: usize = 128;

macro_rules! cases {
    ($( $id:literal [$($gate:expr),*] => $f:ident ),* $(,)?) => {
        vec![$( Case { id: $id, gates: vec![$($gate),*], run: |c| Box::pin($f(c)) } ),*]
    };
}

use Gate::{Has, Lacks};
const CTL: Need = Need::Plugin(PluginCap::ControllerService);
const fn ctl(t: CtlCap) -> Need {
    Need::Controller(t)
}
const fn node(t: NodeCap) -> Need {
    Need::Node(t)
}

pub fn all() -> Vec<Case> {
    let cdv = ctl(CtlCap::CreateDeleteVolume);
    cases![
        "identity.plugin-capabilities" [] => plugin_capabilities,
        "identity.probe" [] => probe,
        "identity.plugin-info" [] => plugin_info,
        "controller.capabilities" [Has(CTL)] => controller_capabilities,
        "controller.get-capacity" [Has(CTL), Has(ctl(CtlCap::GetCapacity))] => get_capacity,
        "controller.list-volumes" [Has(CTL), Has(ctl(CtlCap::ListVolumes))] => list_volumes,
        "controller.list-volumes.invalid-token" [Has(CTL), Has(ctl(CtlCap::ListVolumes))] => list_volumes_bad_token,
        "controller.list-volumes.create-delete" [Has(CTL), Has(ctl(CtlCap::ListVolumes)), Has(cdv)] => list_volumes_create_delete,
        "controller.create.no-name" [Has(CTL), Has(cdv)] => create_no_name,
        "controller.create.no-capabilities" [Has(CTL), Has(cdv)] => create_no_caps,
        "controller.create.no-capacity" [Has(CTL), Has(cdv)] => create_plain,
        "controller.create.with-capacity" [Has(CTL), Has(cdv)] => create_with_capacity,
        "controller.create.same-name-same-capacity" [Has(CTL), Has(cdv)] => create_twice,
        "controller.create.same-name-other-capacity" [Has(CTL), Has(cdv)] => create_twice_other_size,
        "controller.create.max-length-name" [Has(CTL), Has(cdv)] => create_max_name,
        "controller.delete.no-id" [Has(CTL), Has(cdv)] => delete_no_id,
        "controller.delete.invalid-id" [Has(CTL), Has(cdv)] => delete_invalid_id,
        "controller.delete.plain" [Has(CTL), Has(cdv)] => delete_plain,
        "controller.validate.no-id" [Has(CTL)] => validate_no_id,
        "controller.validate.no-capabilities" [Has(CTL), Has(cdv)] => validate_no_caps,
        "controller.validate.plain" [Has(CTL), Has(cdv)] => validate_plain,
        "controller.validate.not-found" [Has(CTL)] => validate_not_found,
        "controller.expand.no-id" [Has(CTL), Has(ctl(CtlCap::ExpandVolume))] => expand_no_id,
        "controller.expand.no-range" [Has(CTL), Has(ctl(CtlCap::ExpandVolume))] => expand_no_range,
        "controller.expand.works" [Has(CTL), Has(ctl(CtlCap::ExpandVolume)), Has(cdv)] => expand_works,
        "node.capabilities" [] => node_capabilities,
        "node.info" [] => node_get_info,
        "node.publish.no-id" [] => publish_no_id,
        "node.publish.no-target" [] => publish_no_target,
        "node.publish.no-capability" [] => publish_no_cap,
        "node.publish.single-writer-elsewhere" [Has(node(NodeCap::SingleNodeMultiWriter)), Has(CTL), Has(cdv)] => publish_single_writer_twice,
        "node.unpublish.no-id" [] => unpublish_no_id,
        "node.unpublish.no-target" [] => unpublish_no_target,
        "node.unpublish.removes-target" [Has(CTL), Has(cdv)] => unpublish_removes_target,
        "node.stage.no-id" [Has(node(NodeCap::StageUnstageVolume))] => stage_no_id,
        "node.stage.no-staging-path" [Has(node(NodeCap::StageUnstageVolume))] => stage_no_path,
        "node.stage.no-capability" [Has(node(NodeCap::StageUnstageVolume)), Has(CTL), Has(cdv)] => stage_no_cap,
        "node.unstage.no-id" [Has(node(NodeCap::StageUnstageVolume))] => unstage_no_id,
        "node.unstage.no-staging-path" [Has(node(NodeCap::StageUnstageVolume))] => unstage_no_path,
        "node.stats.no-id" [Has(node(NodeCap::GetVolumeStats))] => stats_no_id,
        "node.stats.no-path" [Has(node(NodeCap::GetVolumeStats))] => stats_no_path,
        "node.stats.not-found" [Has(node(NodeCap::GetVolumeStats))] => stats_not_found,
        "node.stats.wrong-path" [Has(node(NodeCap::GetVolumeStats)), Has(CTL), Has(cdv)] => stats_wrong_path,
        "node.expand.no-id" [Has(node(NodeCap::ExpandVolume))] => node_expand_no_id,
        "node.expand.no-path" [Has(node(NodeCap::ExpandVolume)), Has(CTL), Has(cdv)] => node_expand_no_path,
        "node.expand.not-found" [Has(node(NodeCap::ExpandVolume))] => node_expand_not_found,
        "node.expand.after-publish" [Has(node(NodeCap::ExpandVolume)), Has(CTL), Has(cdv)] => node_expand_after_publish,
        "node.lifecycle" [Has(CTL), Has(cdv)] => node_lifecycle_once,
        "node.lifecycle.idempotent" [Has(CTL), Has(cdv)] => node_lifecycle_repeated,
        // Ours: what the driver does not advertise must answer Unimplemented.
        "unadvertised.controller-publish" [Lacks(ctl(CtlCap::PublishUnpublishVolume))] => unimpl_controller_publish,
        "unadvertised.controller-unpublish" [Lacks(ctl(CtlCap::PublishUnpublishVolume))] => unimpl_controller_unpublish,
        "unadvertised.create-snapshot" [Lacks(ctl(CtlCap::CreateDeleteSnapshot))] => unimpl_create_snapshot,
        "unadvertised.delete-snapshot" [Lacks(ctl(CtlCap::CreateDeleteSnapshot))] => unimpl_delete_snapshot,
        "unadvertised.list-snapshots" [Lacks(ctl(CtlCap::ListSnapshots))] => unimpl_list_snapshots,
        "unadvertised.get-snapshot" [Lacks(ctl(CtlCap::GetSnapshot))] => unimpl_get_snapshot,
        "unadvertised.modify-volume" [Lacks(ctl(CtlCap::ModifyVolume))] => unimpl_modify,
        "unadvertised.controller-expand" [Lacks(ctl(CtlCap::ExpandVolume))] => unimpl_controller_expand,
        "unadvertised.controller-get-volume" [Lacks(ctl(CtlCap::GetVolume))] => unimpl_get_volume,
        "unadvertised.node-expand" [Lacks(node(NodeCap::ExpandVolume))] => unimpl_node_expand,
        "unadvertised.group-controller" [Lacks(Need::Plugin(PluginCap::GroupControllerService))] => unimpl_group,
    ]
}

// ---- Identity

async fn plugin_capabilities(c: &Ctx) -> Step {
    use csi::plugin_capability::{Type, volume_expansion};
    let r = must(
        c.identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    )?;
    for cap in r.capabilities {
        match cap.r#type {
            Some(Type::Service(s)) => match PluginCap::try_from(s.r#type) {
                Ok(
                    PluginCap::ControllerService
                    | PluginCap::VolumeAccessibilityConstraints
                    | PluginCap::GroupControllerService
                    | PluginCap::SnapshotMetadataService,
                ) => {}
                _ => return Err(Stop::Fail(format!("unknown service {}", s.r#type))),
            },
            Some(Type::VolumeExpansion(e)) => match volume_expansion::Type::try_from(e.r#type) {
                Ok(volume_expansion::Type::Online | volume_expansion::Type::Offline) => {}
                _ => {
                    return Err(Stop::Fail(format!(
                        "unknown volume expansion mode {}",
                        e.r#type
                    )));
                }
            },
            None => return Err(Stop::Fail("a capability without a type".into())),
        }
    }
    Ok(())
}

async fn probe(c: &Ctx) -> Step {
    // Ready or not, the call itself must succeed.
    must(c.identity().probe(csi::ProbeRequest {}).await, "Probe")?;
    Ok(())
}

/// Starts and ends with a letter; in between letters, digits, '-', '.', '_'.
fn valid_plugin_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() >= 2
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphabetic()
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'-' | b'.' | b'_'))
}

async fn plugin_info(c: &Ctx) -> Step {
    let r = must(
        c.identity()
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await,
        "GetPluginInfo",
    )?;
    ensure!(!r.name.is_empty(), "GetPluginInfo: empty name");
    ensure!(
        r.name.len() <= 63,
        "GetPluginInfo: name {:?} longer than 63",
        r.name
    );
    ensure!(
        valid_plugin_name(&r.name),
        "GetPluginInfo: name {:?} has characters outside the allowed set",
        r.name
    );
    Ok(())
}

// ---- Controller

async fn controller_capabilities(c: &Ctx) -> Step {
    let r = must(
        c.ctl()
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await,
        "ControllerGetCapabilities",
    )?;
    for cap in r.capabilities {
        let Some(csi::controller_service_capability::Type::Rpc(rpc)) = cap.r#type else {
            return Err(Stop::Fail("a capability without an rpc".into()));
        };
        match CtlCap::try_from(rpc.r#type) {
            Ok(CtlCap::Unknown) | Err(_) => {
                return Err(Stop::Fail(format!("unknown capability {}", rpc.r#type)));
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

async fn get_capacity(c: &Ctx) -> Step {
    must(
        c.ctl()
            .get_capacity(csi::GetCapacityRequest::default())
            .await,
        "GetCapacity",
    )?;
    Ok(())
}

async fn list(c: &Ctx) -> Step<Vec<csi::list_volumes_response::Entry>> {
    Ok(must(
        c.ctl()
            .list_volumes(csi::ListVolumesRequest::default())
            .await,
        "ListVolumes",
    )?
    .entries)
}

async fn list_volumes(c: &Ctx) -> Step {
    for e in list(c).await? {
        let v = e
            .volume
            .ok_or_else(|| Stop::Fail("ListVolumes: an entry without a volume".into()))?;
        ensure!(!v.volume_id.is_empty(), "ListVolumes: an empty volume_id");
    }
    Ok(())
}

async fn list_volumes_bad_token(c: &Ctx) -> Step {
    expect_code(
        c.ctl()
            .list_volumes(csi::ListVolumesRequest {
                starting_token: "invalid-token".into(),
                ..Default::default()
            })
            .await,
        Code::Aborted,
        "ListVolumes with starting_token \"invalid-token\"",
    )
}

async fn list_volumes_create_delete(c: &Ctx) -> Step {
    let before = list(c).await?.len();
    // The upstream case uses this fixed name.
    let v = c.must_create(c.create_req("sanity")).await?;
    let n = list(c).await?.len();
    ensure!(
        n == before + 1,
        "ListVolumes after a create: {n} entries, expected {}",
        before + 1
    );
    must(c.delete_volume(&v.volume_id).await, "DeleteVolume")?;
    let n = list(c).await?.len();
    ensure!(
        n == before,
        "ListVolumes after the delete: {n} entries, expected {before}"
    );
    Ok(())
}

async fn create_no_name(c: &Ctx) -> Step {
    expect_code(
        c.create_volume(csi::CreateVolumeRequest {
            parameters: c.cfg.params.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "CreateVolume without a name",
    )
}

async fn create_no_caps(c: &Ctx) -> Step {
    expect_code(
        c.create_volume(csi::CreateVolumeRequest {
            name: unique("sanity-controller-create-no-volume-capabilities"),
            parameters: c.cfg.params.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "CreateVolume without volume_capabilities",
    )
}

fn size_ok(v: &csi::Volume, size: i64) -> bool {
    v.capacity_bytes >= size || v.capacity_bytes == 0
}

async fn create_plain(c: &Ctx) -> Step {
    c.must_create(c.create_req(&unique("sanity-controller-create-single-no-capacity")))
        .await?;
    Ok(())
}

async fn create_with_capacity(c: &Ctx) -> Step {
    let r = c
        .create_volume(c.create_req(&unique("sanity-controller-create-single-with-capacity")))
        .await;
    if let Err(s) = &r
        && matches!(s.code(), Code::OutOfRange | Code::Unimplemented)
    {
        return Err(Stop::Skip(format!(
            "required bytes not supported: {:?}",
            s.code()
        )));
    }
    let v = must(r, "CreateVolume")?
        .volume
        .ok_or_else(|| Stop::Fail("CreateVolume: no volume".into()))?;
    ensure!(!v.volume_id.is_empty(), "CreateVolume: empty volume_id");
    ensure!(
        size_ok(&v, c.cfg.volume_size),
        "capacity_bytes {} below the requested {}",
        v.capacity_bytes,
        c.cfg.volume_size
    );
    Ok(())
}

/// The upstream case creates twice; we repeat the second create
/// `--idempotency-count` times, each with the same answer.
async fn create_twice(c: &Ctx) -> Step {
    let name = unique("sanity-controller-create-twice");
    let size = c.cfg.volume_size;
    let v1 = c.must_create(c.create_req(&name)).await?;
    ensure!(
        size_ok(&v1, size),
        "first create: capacity_bytes {} below {size}",
        v1.capacity_bytes
    );
    for i in 0..c.cfg.idempotency.max(1) {
        let v2 = c.must_create(c.create_req(&name)).await?;
        ensure!(
            size_ok(&v2, size),
            "create #{}: capacity_bytes {} below {size}",
            i + 2,
            v2.capacity_bytes
        );
        ensure!(
            v1.volume_id == v2.volume_id,
            "create #{}: volume_id {:?}, the first create returned {:?}",
            i + 2,
            v2.volume_id,
            v1.volume_id
        );
        ensure!(
            v1.capacity_bytes == v2.capacity_bytes,
            "create #{}: capacity_bytes {}, the first create returned {}",
            i + 2,
            v2.capacity_bytes,
            v1.capacity_bytes
        );
    }
    Ok(())
}

async fn create_twice_other_size(c: &Ctx) -> Step {
    let name = unique("sanity-controller-create-twice-different");
    let size1 = c.cfg.volume_size;
    let mut req1 = c.create_req(&name);
    req1.capacity_range = Some(csi::CapacityRange {
        required_bytes: size1,
        limit_bytes: size1,
    });
    let v1 = c.must_create(req1).await?;
    if v1.capacity_bytes == 0 {
        return Err(Stop::Skip("capacity of the volume is unknown".into()));
    }
    ensure!(
        v1.capacity_bytes == size1,
        "capacity_bytes {} with required_bytes == limit_bytes == {size1}",
        v1.capacity_bytes
    );
    let size2 = 2 * size1;
    let mut req2 = c.create_req(&name);
    req2.capacity_range = Some(csi::CapacityRange {
        required_bytes: size2,
        limit_bytes: size2,
    });
    expect_code(
        c.create_volume(req2).await,
        Code::AlreadyExists,
        "CreateVolume of the same name with twice the capacity",
    )
}

async fn create_max_name(c: &Ctx) -> Step {
    let name = unique_len("sanity-controller-create-maxlen", MAX_NAME_LEN);
    let v = c.must_create(c.create_req(&name)).await?;
    ensure!(
        size_ok(&v, c.cfg.volume_size),
        "capacity_bytes {} below {}",
        v.capacity_bytes,
        c.cfg.volume_size
    );
    Ok(())
}

async fn delete_no_id(c: &Ctx) -> Step {
    expect_code(
        c.ctl()
            .delete_volume(csi::DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "DeleteVolume without volume_id",
    )
}

async fn delete_invalid_id(c: &Ctx) -> Step {
    must(
        c.delete_volume(INVALID_VOLUME_ID).await,
        "DeleteVolume of an unknown id",
    )?;
    Ok(())
}

/// The upstream case deletes once; we repeat the delete
/// `--idempotency-count` times, each succeeding.
async fn delete_plain(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-controller-create-appropriate")))
        .await?;
    for i in 0..c.cfg.idempotency.max(1) {
        must(
            c.delete_volume(&v.volume_id).await,
            &format!("DeleteVolume #{}", i + 1),
        )?;
    }
    Ok(())
}

async fn validate_no_id(c: &Ctx) -> Step {
    expect_code(
        c.ctl()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest::default())
            .await,
        Code::InvalidArgument,
        "ValidateVolumeCapabilities without volume_id",
    )
}

async fn validate_no_caps(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-controller-validate-nocaps")))
        .await?;
    expect_code(
        c.ctl()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "ValidateVolumeCapabilities without volume_capabilities",
    )
}

async fn validate_plain(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-controller-validate")))
        .await?;
    let r = must(
        c.ctl()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id,
                volume_capabilities: vec![c.snw()],
                ..Default::default()
            })
            .await,
        "ValidateVolumeCapabilities",
    )?;
    if let Some(conf) = r.confirmed {
        ensure!(
            !conf.volume_capabilities.is_empty(),
            "confirmed without volume_capabilities"
        );
    }
    Ok(())
}

async fn validate_not_found(c: &Ctx) -> Step {
    expect_code(
        c.ctl()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: fake_volume_id(),
                volume_capabilities: vec![c.snw()],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "ValidateVolumeCapabilities of an unknown volume",
    )
}

fn expand_req(c: &Ctx, id: &str) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: c.cfg.expand_size,
            limit_bytes: 0,
        }),
        volume_capability: Some(c.snw()),
        ..Default::default()
    }
}

async fn expand_no_id(c: &Ctx) -> Step {
    expect_code(
        c.ctl().controller_expand_volume(expand_req(c, "")).await,
        Code::InvalidArgument,
        "ControllerExpandVolume without volume_id",
    )
}

async fn expand_no_range(c: &Ctx) -> Step {
    // As upstream: the id is empty too, so either field may be named.
    expect_code(
        c.ctl()
            .controller_expand_volume(csi::ControllerExpandVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "ControllerExpandVolume without capacity_range",
    )
}

async fn controller_expand(c: &Ctx, id: &str) -> Step {
    let r = must(
        c.ctl().controller_expand_volume(expand_req(c, id)).await,
        "ControllerExpandVolume",
    )?;
    ensure!(
        r.capacity_bytes == c.cfg.expand_size,
        "ControllerExpandVolume: capacity_bytes {}, expected {}",
        r.capacity_bytes,
        c.cfg.expand_size
    );
    Ok(())
}

async fn expand_works(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-expand-volume")))
        .await?;
    controller_expand(c, &v.volume_id).await
}

// ---- Node

async fn node_capabilities(c: &Ctx) -> Step {
    let r = must(
        c.node()
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await,
        "NodeGetCapabilities",
    )?;
    for cap in r.capabilities {
        let Some(csi::node_service_capability::Type::Rpc(rpc)) = cap.r#type else {
            return Err(Stop::Fail("a capability without an rpc".into()));
        };
        // The upstream list accepts UNKNOWN here; anything outside the enum fails.
        ensure!(
            NodeCap::try_from(rpc.r#type).is_ok(),
            "unknown capability {}",
            rpc.r#type
        );
    }
    Ok(())
}

async fn node_get_info(c: &Ctx) -> Step {
    let ni = c.node_info().await?;
    ensure!(
        ni.max_volumes_per_node >= 0,
        "max_volumes_per_node {} is negative",
        ni.max_volumes_per_node
    );
    if c.has(Need::Plugin(PluginCap::VolumeAccessibilityConstraints)) {
        ensure!(
            ni.accessible_topology.is_some(),
            "VOLUME_ACCESSIBILITY_CONSTRAINTS advertised, but no accessible_topology"
        );
    }
    Ok(())
}

async fn publish_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_publish_volume(csi::NodePublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "NodePublishVolume without volume_id",
    )
}

async fn publish_no_target(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fake_volume_id(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodePublishVolume without target_path",
    )
}

async fn publish_no_cap(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fake_volume_id(),
                target_path: c.target(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodePublishVolume without volume_capability",
    )
}

async fn publish_single_writer_twice(c: &Ctx) -> Step {
    let cap = c.cap(Mode::SingleNodeSingleWriter);
    let mut req = c.create_req(&unique("sanity-node-publish-single-node-single-writer"));
    req.volume_capabilities = vec![cap.clone()];
    let v = c.must_create(req).await?;
    c.node_info().await?;
    c.stage(&v, &cap).await?;
    c.publish(&v, &cap).await?;
    expect_code(
        c.node()
            .node_publish_volume(c.publish_req(&v, &cap, c.target_named("other_target")))
            .await,
        Code::FailedPrecondition,
        "a second NodePublishVolume of a single-writer volume at another target",
    )
}

async fn unpublish_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "NodeUnpublishVolume without volume_id",
    )
}

async fn unpublish_no_target(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: fake_volume_id(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeUnpublishVolume without target_path",
    )
}

async fn unpublish_removes_target(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-node-unpublish-volume")))
        .await?;
    c.node_info().await?;
    let cap = c.snw();
    c.stage(&v, &cap).await?;
    c.publish(&v, &cap).await?;
    let target = c.target();
    ensure!(
        std::fs::symlink_metadata(&target).is_ok(),
        "{target} does not exist after NodePublishVolume"
    );
    must(
        c.node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                target_path: target.clone(),
            })
            .await,
        "NodeUnpublishVolume",
    )?;
    ensure!(
        std::fs::symlink_metadata(&target).is_err(),
        "{target} still exists after NodeUnpublishVolume"
    );
    Ok(())
}

/// The suite puts a made-up device into the publish context of these.
fn mock_context() -> std::collections::HashMap<String, String> {
    [("device".to_owned(), "/dev/mock".to_owned())].into()
}

async fn stage_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                staging_target_path: c.staging(),
                volume_capability: Some(c.snw()),
                publish_context: mock_context(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeStageVolume without volume_id",
    )
}

async fn stage_no_path(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: fake_volume_id(),
                volume_capability: Some(c.snw()),
                publish_context: mock_context(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeStageVolume without staging_target_path",
    )
}

async fn stage_no_cap(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-node-stage-nocaps")))
        .await?;
    expect_code(
        c.node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id,
                staging_target_path: c.staging(),
                publish_context: mock_context(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeStageVolume without volume_capability",
    )
}

async fn unstage_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                staging_target_path: c.staging(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeUnstageVolume without volume_id",
    )
}

async fn unstage_no_path(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: fake_volume_id(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeUnstageVolume without staging_target_path",
    )
}

async fn stats_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeGetVolumeStats without volume_id",
    )
}

async fn stats_no_path(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: fake_volume_id(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeGetVolumeStats without volume_path",
    )
}

async fn stats_not_found(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: fake_volume_id(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeGetVolumeStats of an unknown volume",
    )
}

async fn stats_wrong_path(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-node-get-volume-stats")))
        .await?;
    c.node_info().await?;
    let cap = c.snw();
    c.stage(&v, &cap).await?;
    c.publish(&v, &cap).await?;
    expect_code(
        c.node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id,
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeGetVolumeStats of a published volume at a path where it is not",
    )
}

async fn node_expand_no_id(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_path: c.cfg.target_dir.display().to_string(),
                volume_capability: Some(c.snw()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeExpandVolume without volume_id",
    )
}

async fn node_expand_no_path(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-node-expand-volume-valid-id")))
        .await?;
    expect_code(
        c.node()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: v.volume_id,
                volume_capability: Some(c.snw()),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "NodeExpandVolume without volume_path",
    )
}

async fn node_expand_not_found(c: &Ctx) -> Step {
    expect_code(
        c.node()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: fake_volume_id(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "NodeExpandVolume of an unknown volume",
    )
}

async fn node_expand_after_publish(c: &Ctx) -> Step {
    let v = c
        .must_create(c.create_req(&unique("sanity-node-expand-volume")))
        .await?;
    if c.has(Need::Controller(CtlCap::ExpandVolume)) {
        controller_expand(c, &v.volume_id).await?;
    }
    c.node_info().await?;
    let cap = c.snw();
    c.stage(&v, &cap).await?;
    c.publish(&v, &cap).await?;
    must(
        c.node()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: v.volume_id,
                volume_path: c.target(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: c.cfg.expand_size,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        "NodeExpandVolume after NodePublishVolume",
    )?;
    Ok(())
}

/// Create in the node's topology, stage `count` times, publish `count`
/// times, then read the stats of the target (the cleanup unpublishes,
/// unstages and deletes).
async fn node_lifecycle(c: &Ctx, count: usize) -> Step {
    let ni = c.node_info().await?;
    let mut req = c.create_req(&unique(&format!("sanity-node-full-{count}")));
    if let Some(t) = ni.accessible_topology {
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![t],
            preferred: Vec::new(),
        });
    }
    let v = c.must_create(req).await?;
    let cap = c.snw();
    if c.has(Need::Node(NodeCap::StageUnstageVolume)) {
        for i in 0..count {
            c.stage(&v, &cap)
                .await
                .map_err(|e| numbered(e, "stage", i))?;
        }
    }
    for i in 0..count {
        c.publish(&v, &cap)
            .await
            .map_err(|e| numbered(e, "publish", i))?;
    }
    if c.has(Need::Node(NodeCap::GetVolumeStats)) {
        let r = must(
            c.node()
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: v.volume_id,
                    volume_path: c.target(),
                    ..Default::default()
                })
                .await,
            "NodeGetVolumeStats",
        )?;
        ensure!(!r.usage.is_empty(), "NodeGetVolumeStats: no usage");
    }
    Ok(())
}

fn numbered(e: Stop, what: &str, i: usize) -> Stop {
    match e {
        Stop::Fail(m) => Stop::Fail(format!("{what} #{}: {m}", i + 1)),
        s => s,
    }
}

async fn node_lifecycle_once(c: &Ctx) -> Step {
    node_lifecycle(c, 1).await
}

async fn node_lifecycle_repeated(c: &Ctx) -> Step {
    if c.cfg.idempotency == 0 {
        return Err(Stop::Skip("--idempotency-count is 0".into()));
    }
    node_lifecycle(c, c.cfg.idempotency).await
}

// ---- Ours: unadvertised RPCs answer Unimplemented (well-formed requests,
// so that nothing but the missing capability can be the answer).

fn unimpl<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, rpc: &str) -> Step {
    expect_code(
        r,
        Code::Unimplemented,
        &format!("{rpc} (capability not advertised)"),
    )
}

async fn unimpl_controller_publish(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: fake_volume_id(),
            node_id: fake_node_id(),
            volume_capability: Some(c.snw()),
            ..Default::default()
        })
        .await;
    unimpl(r, "ControllerPublishVolume")
}

async fn unimpl_controller_unpublish(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: fake_volume_id(),
            node_id: fake_node_id(),
            ..Default::default()
        })
        .await;
    unimpl(r, "ControllerUnpublishVolume")
}

async fn unimpl_create_snapshot(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: fake_volume_id(),
            name: unique("sanity-snapshot"),
            ..Default::default()
        })
        .await;
    unimpl(r, "CreateSnapshot")
}

async fn unimpl_delete_snapshot(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: unique("fake-snapshot-id"),
            ..Default::default()
        })
        .await;
    unimpl(r, "DeleteSnapshot")
}

async fn unimpl_list_snapshots(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await;
    unimpl(r, "ListSnapshots")
}

async fn unimpl_get_snapshot(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: unique("fake-snapshot-id"),
            ..Default::default()
        })
        .await;
    unimpl(r, "GetSnapshot")
}

async fn unimpl_modify(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: fake_volume_id(),
            mutable_parameters: [("XXX_FakeKey".to_owned(), "XXX_FakeValue".to_owned())].into(),
            ..Default::default()
        })
        .await;
    unimpl(r, "ControllerModifyVolume")
}

async fn unimpl_controller_expand(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .controller_expand_volume(expand_req(c, &fake_volume_id()))
        .await;
    unimpl(r, "ControllerExpandVolume")
}

async fn unimpl_get_volume(c: &Ctx) -> Step {
    let r = c
        .ctl()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: fake_volume_id(),
        })
        .await;
    unimpl(r, "ControllerGetVolume")
}

async fn unimpl_node_expand(c: &Ctx) -> Step {
    let r = c
        .node()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: fake_volume_id(),
            volume_path: c.target(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: c.cfg.expand_size,
                limit_bytes: 0,
            }),
            volume_capability: Some(c.snw()),
            ..Default::default()
        })
        .await;
    unimpl(r, "NodeExpandVolume")
}

async fn unimpl_group(c: &Ctx) -> Step {
    let r = c
        .group()
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await;
    unimpl(r, "GroupControllerGetCapabilities")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_ids_are_unique() {
        let all = all();
        let mut ids: Vec<_> = all.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate case ids");
    }

    #[test]
    fn plugin_names() {
        assert!(valid_plugin_name("pmem-csi.intel.com"));
        assert!(valid_plugin_name("ab"));
        assert!(!valid_plugin_name("a"));
        assert!(!valid_plugin_name("1abc"));
        assert!(!valid_plugin_name("abc1"));
        assert!(!valid_plugin_name("ab c"));
        assert!(!valid_plugin_name(&"a".repeat(64)));
    }

    #[test]
    fn padded_names_have_the_exact_length() {
        assert_eq!(unique_len("x", MAX_NAME_LEN).len(), MAX_NAME_LEN);
        assert_eq!(
            unique_len(&"y".repeat(200), MAX_NAME_LEN).len(),
            MAX_NAME_LEN
        );
    }
}

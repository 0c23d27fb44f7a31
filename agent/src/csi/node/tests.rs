//! Node RPC logic against the fake host and a real ledger (with a fake
//! device backend): idempotency, conflicts, preconditions, ephemeral
//! volumes and start-up collection. No root needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use pmem_allocator::{
    Allocator, Backend, Device, DeviceRequest, InventoryItem, RegionSpec, Result as AllocResult,
};
use pmem_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
use tonic::Code;

use super::*;
use crate::config::{Args, Config};
use crate::mount::fake::{FAKE_DEV_DIR, FakeHost};
use crate::store::Store;

const MIB: u64 = 1 << 20;

/// Devices appear as `/dev/fake/<volume id>`.
#[derive(Debug)]
struct FakeBackend;

fn fake_device(req: &DeviceRequest) -> Device {
    Device {
        path: Some(format!("{FAKE_DEV_DIR}{}", req.volume_id)),
        size: req.size,
    }
}

impl Backend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn describe(&self) -> String {
        "fake backend".into()
    }
    fn regions(&self) -> AllocResult<Vec<RegionSpec>> {
        Ok(vec![RegionSpec {
            id: "region0".into(),
            size: Bytes::gib(8),
            align: Bytes::mib(16),
            ns_slots: 1024,
            numa_node: 0,
            location: "memory".into(),
        }])
    }
    fn create(&self, req: &DeviceRequest) -> AllocResult<Device> {
        Ok(fake_device(req))
    }
    fn find(&self, req: &DeviceRequest) -> AllocResult<Option<Device>> {
        Ok(Some(fake_device(req)))
    }
    fn destroy(&self, _req: &DeviceRequest) -> AllocResult<()> {
        Ok(())
    }
    fn erase(
        &self,
        _req: &DeviceRequest,
        _progress: pmem_allocator::backend::Progress<'_>,
    ) -> AllocResult<()> {
        Ok(())
    }
    fn resize(&self, req: &DeviceRequest) -> AllocResult<Device> {
        Ok(fake_device(req))
    }
    fn inventory(&self) -> AllocResult<Vec<InventoryItem>> {
        Ok(Vec::new())
    }
    fn remove_orphan(&self, _item: &InventoryItem) -> AllocResult<()> {
        Ok(())
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    base: PathBuf,
    host: Arc<FakeHost>,
    driver: Arc<Driver>,
    node: NodeService,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(true)
    }

    /// `can_expand`: what the backend says about growing volumes.
    fn with(can_expand: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let state = base.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let root = base.join("kubelet");
        std::fs::create_dir_all(&root).unwrap();
        let args = Args::parse_from([
            "pmem-agent",
            "--state-dir",
            state.to_str().unwrap(),
            "--node-id",
            "n1",
            "--kubelet-root",
            root.to_str().unwrap(),
        ]);
        let cfg = Config::load(args).unwrap();
        let alloc = Allocator::open(&cfg.ledger_path(), Arc::new(FakeBackend)).unwrap();
        let store: Store = Arc::new(alloc);
        let driver = Arc::new(Driver::new(cfg, store, "fake", can_expand));
        let host = Arc::new(FakeHost::new());
        let node = NodeService::with_host(Arc::clone(&driver), host.clone());
        Rig {
            _dir: dir,
            base,
            host,
            driver,
            node,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.base.join("kubelet").join(rel)
    }

    fn create(&self, name: &str, mib: u64) -> Volume {
        let mut req = CreateRequest::new(name, Bytes::mib(mib));
        if name.starts_with("fileio") {
            req.usage = Usage::FileIo;
        }
        self.driver.alloc.create_volume(&req).unwrap()
    }

    fn dev(&self, v: &Volume) -> PathBuf {
        PathBuf::from(v.device.clone().unwrap())
    }

    fn pubs(&self, v: &Volume) -> Vec<Publication> {
        self.driver.alloc.publications(Some(&v.id)).unwrap()
    }
}

fn mount_cap(fs: &str, mode: Mode, flags: &[&str]) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

fn xfs() -> csi::VolumeCapability {
    mount_cap("xfs", Mode::SingleNodeWriter, &[])
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn stage_req(id: &str, path: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

fn unstage_req(id: &str, path: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.display().to_string(),
    }
}

fn stats_req(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

fn expand_req(
    id: &str,
    path: &Path,
    staging: Option<&Path>,
    required: u64,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: staging.map(|s| s.display().to_string()).unwrap_or_default(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: i64::try_from(required).unwrap(),
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// Code and message of a failed call; panics on success.
fn fails<T: std::fmt::Debug>(r: AgentResult<T>) -> (Code, String) {
    let e = r.expect_err("call should fail");
    (e.code(), e.to_string())
}

fn assert_fails<T: std::fmt::Debug>(r: AgentResult<T>, code: Code, needle: &str) {
    let (c, m) = fails(r);
    assert_eq!(c, code, "{m}");
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
}

#[tokio::test]
async fn no_expansion_where_the_backend_cannot_grow_volumes() {
    let r = Rig::with(false);
    let caps = r
        .node
        .node_get_capabilities(Request::new(csi::NodeGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let expand = rpc::Type::ExpandVolume as i32;
    assert_eq!(caps.len(), CAPABILITIES.len() - 1);
    assert!(caps.iter().all(|c| c.r#type
        != Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc { r#type: expand }
        ))));
    let v = r.create("v", 64);
    let e = r
        .node
        .node_expand_volume(Request::new(csi::NodeExpandVolumeRequest {
            volume_id: v.id.clone(),
            volume_path: r.path("x").display().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("fake backend"), "{}", e.message());
}

#[tokio::test]
async fn capabilities_and_info() {
    let r = Rig::new();
    let caps = r
        .node
        .node_get_capabilities(Request::new(csi::NodeGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let got: Vec<i32> = caps
        .iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    let want: Vec<i32> = CAPABILITIES.iter().map(|t| *t as i32).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 5);
    let before = r.node.info().await.unwrap();
    assert_eq!(before.node_id, "n1");
    assert_eq!(before.accessible_topology, Some(node_topology("n1")));
    assert_eq!(before.max_volumes_per_node, 8 * 1024 / 16);
    // Recomputed on every call.
    r.create("big", 4096);
    let after = r.node.info().await.unwrap();
    assert!(after.max_volumes_per_node < before.max_volumes_per_node);
}

#[tokio::test]
async fn stage_formats_once_and_repeats_are_ok() {
    let r = Rig::new();
    let v = r.create("pv1", 512);
    let staging = r.path("staging/pv1");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    let dev = r.dev(&v);
    assert_eq!(
        r.host.calls("mkfs"),
        vec![format!("mkfs {} xfs", dev.display())]
    );
    assert_eq!(r.host.calls("mount").len(), 1);
    assert_eq!(
        r.host.calls("extsize"),
        vec![format!("extsize {}", staging.display())]
    );
    let m = r.host.mount_at(&staging).unwrap();
    assert_eq!(m.fs_type, "xfs");
    let pubs = r.pubs(&v);
    assert_eq!(pubs.len(), 1);
    assert_eq!(pubs[0].kind, PublicationKind::Stage);
    assert_eq!(pubs[0].capability, "mount;xfs;;SINGLE_NODE_WRITER");

    // The same call again: nothing new happens.
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    assert_eq!(r.host.calls("mkfs").len(), 1);
    assert_eq!(r.host.calls("mount").len(), 1);

    // Another capability, or another path: ALREADY_EXISTS.
    let ext4 = mount_cap("ext4", Mode::SingleNodeWriter, &[]);
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, ext4)).await,
        Code::AlreadyExists,
        "already staged",
    );
    let noatime = mount_cap("xfs", Mode::SingleNodeWriter, &["noatime"]);
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, noatime)).await,
        Code::AlreadyExists,
        "mount;xfs;;SINGLE_NODE_WRITER",
    );
    assert_fails(
        r.node
            .stage(stage_req(&v.id, &r.path("staging/other"), xfs()))
            .await,
        Code::AlreadyExists,
        "already staged at",
    );

    // A mount left by an interrupted call (no ledger row) is adopted.
    let v2 = r.create("pv2", 512);
    let s2 = r.path("staging/pv2");
    r.host
        .with_device(&r.dev(&v2), |d| d.fs = Some("xfs".into()));
    r.host.mount_raw(&r.dev(&v2), &s2, "xfs");
    r.node.stage(stage_req(&v2.id, &s2, xfs())).await.unwrap();
    assert_eq!(r.host.calls("mount").len(), 1, "{:?}", r.host.calls(""));
    assert_eq!(r.pubs(&v2).len(), 1);
    assert_eq!(r.pubs(&v2)[0].device, r.host.mount_at(&s2).map(|m| m.dev));
}

#[tokio::test]
async fn stage_never_reformats() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    r.host
        .with_device(&r.dev(&v), |d| d.fs = Some("ext4".into()));
    let (code, msg) = fails(r.node.stage(stage_req(&v.id, &staging, xfs())).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("ext4") && msg.contains("refusing to reformat"),
        "{msg}"
    );
    assert!(r.host.calls("mkfs").is_empty());
    assert!(r.pubs(&v).is_empty());
    // No fs_type: the existing filesystem is used.
    let any = mount_cap("", Mode::SingleNodeWriter, &[]);
    r.node.stage(stage_req(&v.id, &staging, any)).await.unwrap();
    assert_eq!(r.host.mount_at(&staging).unwrap().fs_type, "ext4");
    assert!(r.host.calls("mkfs").is_empty());
    assert!(r.host.calls("extsize").is_empty(), "no xfs hint on ext4");

    let w = r.create("pw", 512);
    r.host.with_device(&r.dev(&w), |d| {
        d.other_signature = Some("a gpt partition table".into())
    });
    assert_fails(
        r.node
            .stage(stage_req(&w.id, &r.path("staging/pw"), xfs()))
            .await,
        Code::FailedPrecondition,
        "gpt partition table",
    );
}

#[tokio::test]
async fn small_volumes_cannot_hold_xfs() {
    let r = Rig::new();
    r.host.state().default_size = 128 * MIB;
    let v = r.create("small", 128);
    let staging = r.path("staging/small");
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, xfs())).await,
        Code::FailedPrecondition,
        "at least 300MiB",
    );
    assert!(r.host.calls("mkfs").is_empty());
    let ext4 = mount_cap("ext4", Mode::SingleNodeWriter, &[]);
    r.node
        .stage(stage_req(&v.id, &staging, ext4))
        .await
        .unwrap();
    assert_eq!(r.host.calls("mkfs").len(), 1);
}

#[tokio::test]
async fn dax_when_the_device_has_it_and_a_condition_when_not() {
    let r = Rig::new();
    let with = r.create("dax", 512);
    r.host.with_device(&r.dev(&with), |d| d.dax = true);
    let s1 = r.path("staging/dax");
    r.node.stage(stage_req(&with.id, &s1, xfs())).await.unwrap();
    assert!(
        r.host.calls("mount")[0].ends_with(" dax"),
        "{:?}",
        r.host.calls("mount")
    );
    let st = r.node.stats(stats_req(&with.id, &s1)).await.unwrap();
    let c = st.volume_condition.unwrap();
    assert!(!c.abnormal, "{}", c.message);

    let without = r.create("nodax", 512);
    let s2 = r.path("staging/nodax");
    r.node
        .stage(stage_req(&without.id, &s2, xfs()))
        .await
        .unwrap();
    assert!(
        r.host.calls("mount")[1].ends_with(" xfs "),
        "{:?}",
        r.host.calls("mount")
    );
    let st = r.node.stats(stats_req(&without.id, &s2)).await.unwrap();
    let c = st.volume_condition.unwrap();
    assert!(c.abnormal);
    assert!(
        c.message.contains("AppDirect requested but device")
            && c.message.contains("mounted without dax"),
        "{}",
        c.message
    );
    // Usage is still reported.
    assert_eq!(st.usage.len(), 2);

    // FileIO never asks for dax.
    let fio = r.create("fileio", 512);
    let s3 = r.path("staging/fileio");
    r.node.stage(stage_req(&fio.id, &s3, xfs())).await.unwrap();
    let c = r
        .node
        .stats(stats_req(&fio.id, &s3))
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(!c.abnormal, "{}", c.message);
}

#[tokio::test]
async fn dax_is_confirmed_from_the_mount_table() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    r.host.with_device(&r.dev(&v), |d| {
        d.dax = true;
        d.ignore_dax = true;
    });
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, xfs())).await,
        Code::FailedPrecondition,
        "did not enable DAX",
    );
    assert!(r.host.mount_at(&staging).is_none(), "undone");
    assert!(r.pubs(&v).is_empty());

    // Found mounted without dax by an earlier call: kept, and reported.
    r.host.mount_raw(&r.dev(&v), &staging, "xfs");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    assert!(r.host.mount_at(&staging).is_some());
    let c = r
        .node
        .stats(stats_req(&v.id, &staging))
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(c.abnormal);
    assert!(c.message.contains("has DAX, but"), "{}", c.message);
}

#[tokio::test]
async fn publish_lifecycle_with_preconditions_and_conflicts() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let t1 = r.path("pods/a/vol");
    let t2 = r.path("pods/b/vol");

    assert_fails(
        r.node
            .publish(publish_req(&v.id, &staging, &t1, xfs(), false))
            .await,
        Code::FailedPrecondition,
        "not staged",
    );
    let mut no_staging = publish_req(&v.id, &staging, &t1, xfs(), false);
    no_staging.staging_target_path.clear();
    assert_fails(
        r.node.publish(no_staging).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    assert_fails(
        r.node
            .publish(publish_req(&v.id, &r.path("staging/x"), &t1, xfs(), false))
            .await,
        Code::FailedPrecondition,
        "is staged at",
    );
    assert_fails(
        r.node
            .publish(publish_req(&v.id, &staging, &t1, block_cap(), false))
            .await,
        Code::FailedPrecondition,
        "block access",
    );

    r.node
        .publish(publish_req(&v.id, &staging, &t1, xfs(), false))
        .await
        .unwrap();
    assert_eq!(
        r.host.calls("bind"),
        vec![format!("bind {} {}", staging.display(), t1.display())]
    );
    assert!(r.host.state().dirs.contains(&t1));
    // Repeat: OK, nothing new.
    r.node
        .publish(publish_req(&v.id, &staging, &t1, xfs(), false))
        .await
        .unwrap();
    assert_eq!(r.host.calls("bind").len(), 1);
    // Same target, read-only now: conflict.
    assert_fails(
        r.node
            .publish(publish_req(&v.id, &staging, &t1, xfs(), true))
            .await,
        Code::AlreadyExists,
        "readonly=false",
    );
    // A second, read-only target.
    r.node
        .publish(publish_req(&v.id, &staging, &t2, xfs(), true))
        .await
        .unwrap();
    assert!(r.host.calls("bind")[1].ends_with(" ro"));
    assert!(r.host.mount_at(&t2).unwrap().read_only());
    assert_eq!(r.pubs(&v).len(), 3);
    let st = r.node.stats(stats_req(&v.id, &t2)).await.unwrap();
    assert_eq!(st.usage.len(), 2);

    // Deleting or unstaging while published is refused.
    let id = v.id.clone();
    let e = AgentError::from(r.driver.alloc.delete_volume(&id).unwrap_err());
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_fails(
        r.node.unstage(unstage_req(&v.id, &staging)).await,
        Code::FailedPrecondition,
        "still published",
    );

    r.node.unpublish(unpublish_req(&v.id, &t1)).await.unwrap();
    assert!(r.host.mount_at(&t1).is_none());
    assert!(!r.host.state().dirs.contains(&t1), "target removed");
    // Again, and for an unknown volume: OK.
    r.node.unpublish(unpublish_req(&v.id, &t1)).await.unwrap();
    r.node
        .unpublish(unpublish_req("pmem-unknown", &t1))
        .await
        .unwrap();
    r.node.unpublish(unpublish_req(&v.id, &t2)).await.unwrap();
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    assert!(r.host.mount_at(&staging).is_none());
    assert!(r.pubs(&v).is_empty());
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    r.driver.alloc.delete_volume(&v.id).unwrap();
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
}

#[tokio::test]
async fn single_node_single_writer_allows_one_target() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let cap = mount_cap("xfs", Mode::SingleNodeSingleWriter, &[]);
    r.node
        .stage(stage_req(&v.id, &staging, cap.clone()))
        .await
        .unwrap();
    r.node
        .publish(publish_req(
            &v.id,
            &staging,
            &r.path("pods/a/v"),
            cap.clone(),
            false,
        ))
        .await
        .unwrap();
    assert_fails(
        r.node
            .publish(publish_req(
                &v.id,
                &staging,
                &r.path("pods/b/v"),
                cap,
                false,
            ))
            .await,
        Code::FailedPrecondition,
        "SINGLE_NODE_SINGLE_WRITER",
    );
}

#[tokio::test]
async fn mount_flags_reach_the_mounts() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let cap = mount_cap("xfs", Mode::SingleNodeWriter, &["noatime", "nouuid"]);
    r.node
        .stage(stage_req(&v.id, &staging, cap.clone()))
        .await
        .unwrap();
    assert!(r.host.calls("mount")[0].ends_with(" nouuid"));
    let bad = mount_cap("xfs", Mode::SingleNodeWriter, &["bind"]);
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, bad)).await,
        Code::InvalidArgument,
        "mount_flags",
    );
}

#[tokio::test]
async fn block_volumes_are_bound_device_nodes() {
    let r = Rig::new();
    let v = r.create("blk", 64);
    let staging = r.path("staging/blk");
    let target = r.path("pods/a/dev");
    r.node
        .stage(stage_req(&v.id, &staging, block_cap()))
        .await
        .unwrap();
    assert!(r.host.calls("mount").is_empty() && r.host.calls("mkfs").is_empty());
    r.node
        .publish(publish_req(&v.id, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    assert!(r.host.state().files.contains(&target));
    assert_eq!(
        r.host.calls("bind"),
        vec![format!("bind {} {}", r.dev(&v).display(), target.display())]
    );
    r.node
        .publish(publish_req(&v.id, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    assert_eq!(r.host.calls("bind").len(), 1);
    let st = r.node.stats(stats_req(&v.id, &target)).await.unwrap();
    assert_eq!(st.usage.len(), 1);
    assert_eq!(st.usage[0].total, 1 << 30);
    assert_eq!(st.usage[0].unit, Unit::Bytes as i32);
    assert!(!st.volume_condition.unwrap().abnormal);
    let st = r.node.stats(stats_req(&v.id, &staging)).await.unwrap();
    assert!(!st.volume_condition.unwrap().abnormal);
    let e = r
        .node
        .expand(expand_req(&v.id, &target, Some(&staging), 0))
        .await
        .unwrap();
    assert_eq!(e.capacity_bytes, 1 << 30);
    assert!(r.host.calls("grow").is_empty());
    r.node
        .unpublish(unpublish_req(&v.id, &target))
        .await
        .unwrap();
    assert!(!r.host.state().files.contains(&target));
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    assert!(r.pubs(&v).is_empty());
}

#[tokio::test]
async fn validation_codes() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let outside = r.base.join("elsewhere/pv");

    let mut no_id = stage_req(&v.id, &staging, xfs());
    no_id.volume_id.clear();
    assert_fails(
        r.node.stage(no_id).await,
        Code::InvalidArgument,
        "volume_id is required",
    );
    let mut no_path = stage_req(&v.id, &staging, xfs());
    no_path.staging_target_path.clear();
    assert_fails(
        r.node.stage(no_path).await,
        Code::InvalidArgument,
        "staging_target_path is required",
    );
    let mut rel = stage_req(&v.id, &staging, xfs());
    rel.staging_target_path = "var/lib/x".into();
    assert_fails(r.node.stage(rel).await, Code::InvalidArgument, "absolute");
    let mut no_cap = stage_req(&v.id, &staging, xfs());
    no_cap.volume_capability = None;
    assert_fails(
        r.node.stage(no_cap).await,
        Code::InvalidArgument,
        "volume_capability is required",
    );
    let mut group = xfs();
    if let Some(AccessType::Mount(m)) = &mut group.access_type {
        m.volume_mount_group = "1000".into();
    }
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, group)).await,
        Code::InvalidArgument,
        "volume_mount_group",
    );
    assert_fails(
        r.node
            .stage(stage_req(
                &v.id,
                &staging,
                mount_cap("btrfs", Mode::SingleNodeWriter, &[]),
            ))
            .await,
        Code::InvalidArgument,
        "btrfs",
    );
    assert_fails(
        r.node.stage(stage_req(&v.id, &outside, xfs())).await,
        Code::InvalidArgument,
        "kubelet root",
    );
    assert_fails(
        r.node.stage(stage_req("pmem-nope", &staging, xfs())).await,
        Code::NotFound,
        "pmem-nope",
    );
    let mut ctx_bad = publish_req(&v.id, &staging, &r.path("pods/a/v"), xfs(), false);
    ctx_bad
        .volume_context
        .insert(EPHEMERAL_KEY.into(), "yes".into());
    assert_fails(
        r.node.publish(ctx_bad).await,
        Code::InvalidArgument,
        EPHEMERAL_KEY,
    );
    assert_fails(
        r.node
            .publish(publish_req(&v.id, &staging, &outside, xfs(), false))
            .await,
        Code::InvalidArgument,
        "target_path",
    );
    assert_fails(
        r.node
            .unpublish(unpublish_req(&v.id, Path::new("/a/../b")))
            .await,
        Code::InvalidArgument,
        "..",
    );

    let mut s = stats_req(&v.id, &staging);
    s.volume_path.clear();
    assert_fails(
        r.node.stats(s).await,
        Code::InvalidArgument,
        "volume_path is required",
    );
    assert_fails(
        r.node.stats(stats_req("pmem-nope", &staging)).await,
        Code::NotFound,
        "does not exist",
    );
    assert_fails(
        r.node.stats(stats_req(&v.id, &staging)).await,
        Code::NotFound,
        "not a staging or publish path",
    );
    let mut ex = expand_req(&v.id, &staging, None, 0);
    ex.volume_id.clear();
    assert_fails(r.node.expand(ex).await, Code::InvalidArgument, "volume_id");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    assert_fails(
        r.node
            .expand(expand_req(&v.id, &staging, None, 2 << 30))
            .await,
        Code::OutOfRange,
        "ControllerExpandVolume",
    );
    assert_fails(
        r.node
            .expand(expand_req(&v.id, &r.path("staging/zzz"), None, 0))
            .await,
        Code::NotFound,
        "not a staging or publish path",
    );
}

#[tokio::test]
async fn volumes_without_a_device_cannot_be_staged() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let volume = Volume {
        device: None,
        ..v.clone()
    };
    let e = device_of(&volume).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.to_string().contains("file-only"), "{e}");
    // A device that vanished.
    r.host.remove_device(&r.dev(&v));
    assert_fails(
        r.node
            .stage(stage_req(&v.id, &r.path("staging/pv"), xfs()))
            .await,
        Code::FailedPrecondition,
        "is missing",
    );
}

#[tokio::test]
async fn calls_on_one_volume_do_not_overlap() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let held = r.node.begin(&v.id).unwrap();
    assert_fails(
        r.node.stage(stage_req(&v.id, &staging, xfs())).await,
        Code::Aborted,
        "in progress",
    );
    drop(held);
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
}

#[tokio::test]
async fn unpublish_leaves_other_devices_alone() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let other = r.create("other", 512);
    let target = r.path("pods/a/vol");
    r.host
        .with_device(&r.dev(&other), |d| d.fs = Some("xfs".into()));
    r.host.mount_raw(&r.dev(&other), &target, "xfs");
    // No publication of pv recorded there: OK, and nothing is touched.
    r.node
        .unpublish(unpublish_req(&v.id, &target))
        .await
        .unwrap();
    assert!(r.host.mount_at(&target).is_some());
    assert!(r.host.calls("unmount").is_empty() && r.host.calls("remove").is_empty());
    // Recorded there, but another device is mounted on it now.
    let staging = r.path("staging/pv");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    let t2 = r.path("pods/b/vol");
    r.node
        .publish(publish_req(&v.id, &staging, &t2, xfs(), false))
        .await
        .unwrap();
    r.host.mount_raw(&r.dev(&other), &t2, "xfs");
    assert_fails(
        r.node.unpublish(unpublish_req(&v.id, &t2)).await,
        Code::FailedPrecondition,
        "another device",
    );
    assert_eq!(
        r.host.mount_at(&t2).unwrap().source,
        r.dev(&other).display().to_string()
    );
    assert_eq!(
        r.pubs(&v).len(),
        2,
        "the record stays while the mount is foreign"
    );
}

fn ephemeral_req(id: &str, target: &Path, attrs: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ctx.insert(EPHEMERAL_KEY.into(), "true".into());
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(xfs()),
        volume_context: ctx,
        ..Default::default()
    }
}

#[tokio::test]
async fn ephemeral_inline_lifecycle() {
    let r = Rig::new();
    let target = r.path("pods/p1/volumes/eph");
    let attrs = [
        ("size", "512Mi"),
        ("usage", "FileIO"),
        ("csi.storage.k8s.io/pod.name", "p1"),
        ("csi.storage.k8s.io/pod.namespace", "ns"),
        ("csi.storage.k8s.io/pod.uid", "u-1"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ];
    r.node
        .publish(ephemeral_req("csi-abc", &target, &attrs))
        .await
        .unwrap();
    let v = r.driver.alloc.volume_by_name("csi-abc").unwrap().unwrap();
    assert_eq!(v.persistency, Persistency::Ephemeral);
    assert_eq!(v.usage, Usage::FileIo);
    assert_eq!(v.requested, Bytes::mib(512));
    assert_eq!(v.context.get("csi.storage.k8s.io/pod.name").unwrap(), "p1");
    assert_eq!(v.context.len(), 4);
    assert!(!v.parameters.keys().any(|k| k.starts_with(K8S_PREFIX)));
    // Mounted straight at the target; no staging.
    assert_eq!(r.host.mount_at(&target).unwrap().dev, {
        let d = r.dev(&v);
        r.host.with_device(&d, |d| d.rdev).unwrap()
    });
    let pubs = r.pubs(&v);
    assert_eq!(pubs.len(), 1);
    assert_eq!(pubs[0].kind, PublicationKind::Publish);
    // Repeat: OK, one volume, one mount.
    r.node
        .publish(ephemeral_req("csi-abc", &target, &attrs))
        .await
        .unwrap();
    assert_eq!(r.host.calls("mount").len(), 1);
    assert_eq!(r.driver.alloc.volumes().unwrap().len(), 1);
    // Stats by the kubelet's id.
    let st = r.node.stats(stats_req("csi-abc", &target)).await.unwrap();
    assert_eq!(st.usage.len(), 2);
    // Elsewhere: conflict.
    assert_fails(
        r.node
            .publish(ephemeral_req("csi-abc", &r.path("pods/p2/x"), &attrs))
            .await,
        Code::AlreadyExists,
        "already published",
    );
    r.node
        .unpublish(unpublish_req("csi-abc", &target))
        .await
        .unwrap();
    assert!(r.host.mount_at(&target).is_none());
    assert!(deleted(&r, "csi-abc"));
    r.node
        .unpublish(unpublish_req("csi-abc", &target))
        .await
        .unwrap();
}

#[tokio::test]
async fn ephemeral_inline_errors() {
    let r = Rig::new();
    let t = r.path("pods/p/v");
    assert_fails(
        r.node.publish(ephemeral_req("e1", &t, &[])).await,
        Code::InvalidArgument,
        "\"size\" is required",
    );
    assert_fails(
        r.node
            .publish(ephemeral_req("e1", &t, &[("size", "lots")]))
            .await,
        Code::InvalidArgument,
        "size=\"lots\"",
    );
    assert_fails(
        r.node
            .publish(ephemeral_req("e1", &t, &[("size", "0")]))
            .await,
        Code::InvalidArgument,
        "above zero",
    );
    // Below the xfs minimum: rounded up to it, as CreateVolume does.
    let small = r.path("pods/small/v");
    r.node
        .publish(ephemeral_req("small", &small, &[("size", "100Mi")]))
        .await
        .unwrap();
    let v = r.driver.alloc.volume_by_name("small").unwrap().unwrap();
    assert!(v.size.0 >= crate::mount::XFS_MIN_BYTES, "{}", v.size);
    r.node
        .unpublish(unpublish_req("small", &small))
        .await
        .unwrap();
    assert!(r.driver.alloc.volume_by_name("small").unwrap().is_none());
    // An unknown attribute: the message lists every known key, size too.
    let e = r
        .node
        .publish(ephemeral_req(
            "e1",
            &t,
            &[("size", "1Gi"), ("colour", "red")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let m = e.to_string();
    for k in ["\"colour\"", "size", "usage", "eraseAfter"] {
        assert!(m.contains(k), "{k} not in {m}");
    }
    let mut blk = ephemeral_req("e1", &t, &[("size", "1Gi")]);
    blk.volume_capability = Some(block_cap());
    assert_fails(r.node.publish(blk).await, Code::InvalidArgument, "block");
    assert_fails(
        r.node
            .publish(ephemeral_req("e1", &t, &[("size", "100Gi")]))
            .await,
        Code::ResourceExhausted,
        "not enough space",
    );
    // A failure after the create does not leak the volume.
    r.host.fail("mkfs", "mkfs exploded");
    assert_fails(
        r.node
            .publish(ephemeral_req("e1", &t, &[("size", "1Gi")]))
            .await,
        Code::Internal,
        "mkfs exploded",
    );
    assert!(
        r.driver
            .alloc
            .volumes()
            .unwrap()
            .iter()
            .all(|v| v.state == pmem_allocator::VolumeState::Erasing)
    );
    r.host.unfail("mkfs");
    r.node
        .publish(ephemeral_req("e1", &t, &[("size", "1Gi")]))
        .await
        .unwrap();
    // ext4 may be small.
    let mut small = ephemeral_req("e2", &r.path("pods/q/v"), &[("size", "64Mi")]);
    small.volume_capability = Some(mount_cap("ext4", Mode::SingleNodeWriter, &[]));
    r.node.publish(small).await.unwrap();
}

#[tokio::test]
async fn startup_collects_ephemeral_volumes_whose_mount_is_gone() {
    let r = Rig::new();
    let ta = r.path("pods/a/v");
    let tb = r.path("pods/b/v");
    r.node
        .publish(ephemeral_req("gone", &ta, &[("size", "512Mi")]))
        .await
        .unwrap();
    r.node
        .publish(ephemeral_req("kept", &tb, &[("size", "512Mi")]))
        .await
        .unwrap();
    // A persistent volume with a stale publication is not touched.
    let p = r.create("persistent", 512);
    r.node
        .stage(stage_req(&p.id, &r.path("staging/p"), xfs()))
        .await
        .unwrap();
    r.host.state().mounts.clear();
    // Re-mount "kept" behind the service's back, as after a restart.
    let kept = r.driver.alloc.volume_by_name("kept").unwrap().unwrap();
    r.host.mount_raw(&r.dev(&kept), &tb, "xfs");
    let host: &dyn Host = r.host.as_ref();
    assert_eq!(
        collect_ephemeral(&r.driver, host, false)
            .await
            .deleted
            .len(),
        1
    );
    assert!(deleted(&r, "gone"));
    assert!(r.driver.alloc.volume_by_name("kept").unwrap().is_some());
    assert!(r.driver.alloc.volume(&p.id).unwrap().is_some());
    assert_eq!(r.pubs(&p).len(), 1);
    assert_eq!(
        collect_ephemeral(&r.driver, host, false)
            .await
            .deleted
            .len(),
        0
    );
}

#[tokio::test]
async fn expand_grows_filesystems() {
    let r = Rig::new();
    // xfs: online through the staging mount.
    let v = r.create("x", 512);
    let staging = r.path("staging/x");
    let target = r.path("pods/a/x");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    r.node
        .publish(publish_req(&v.id, &staging, &target, xfs(), true))
        .await
        .unwrap();
    r.host.with_device(&r.dev(&v), |d| d.size = 2 << 30);
    let got = r
        .node
        .expand(expand_req(&v.id, &target, Some(&staging), 2 << 30))
        .await
        .unwrap();
    assert_eq!(got.capacity_bytes, 2 << 30);
    assert_eq!(
        r.host.calls("grow"),
        vec![format!(
            "grow_online xfs {} {}",
            staging.display(),
            2u64 << 30
        )]
    );

    // Asked through the read-only publish alone: the read-write staging
    // mount of the device is used.
    r.host.with_device(&r.dev(&v), |d| d.size = 3 << 30);
    r.node
        .expand(expand_req(&v.id, &target, None, 0))
        .await
        .unwrap();
    assert_eq!(
        r.host.calls("grow").last().unwrap(),
        &format!("grow_online xfs {} {}", staging.display(), 3u64 << 30)
    );

    // ext4: online refused (as without CAP_SYS_RESOURCE) → clear error;
    // a new stage grows it offline; then expand has nothing left to do.
    let e = r.create("e", 512);
    let es = r.path("staging/e");
    let ext4 = mount_cap("ext4", Mode::SingleNodeWriter, &[]);
    r.node
        .stage(stage_req(&e.id, &es, ext4.clone()))
        .await
        .unwrap();
    r.host.with_device(&r.dev(&e), |d| d.size = 2 << 30);
    r.host
        .fail("grow_online", "Permission denied to resize filesystem");
    assert_fails(
        r.node.expand(expand_req(&e.id, &es, None, 0)).await,
        Code::FailedPrecondition,
        "online",
    );
    r.node.unstage(unstage_req(&e.id, &es)).await.unwrap();
    r.node
        .stage(stage_req(&e.id, &es, ext4.clone()))
        .await
        .unwrap();
    assert_eq!(r.host.calls("grow_offline_ext4").len(), 1);
    let got = r
        .node
        .expand(expand_req(&e.id, &es, None, 2 << 30))
        .await
        .unwrap();
    assert_eq!(got.capacity_bytes, 2 << 30);
    assert_eq!(r.host.calls("grow_online").len(), 2, "only the xfs ones");

    // Recorded as staged but not mounted: grown offline.
    r.host.with_device(&r.dev(&e), |d| d.size = 3 << 30);
    r.host.unmount_raw(&es);
    r.node
        .expand(expand_req(&e.id, &es, None, 0))
        .await
        .unwrap();
    assert_eq!(r.host.calls("grow_offline_ext4").len(), 2);
    // An unmounted xfs cannot grow.
    r.host.unmount_raw(&target);
    r.host.unmount_raw(&staging);
    assert_fails(
        r.node.expand(expand_req(&v.id, &staging, None, 0)).await,
        Code::FailedPrecondition,
        "only while mounted",
    );
}

#[tokio::test]
async fn stats_report_missing_mounts_and_devices() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    r.host.unmount_raw(&staging);
    let c = r
        .node
        .stats(stats_req(&v.id, &staging))
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(c.abnormal);
    assert!(c.message.contains("not mounted"), "{}", c.message);
    r.host.remove_device(&r.dev(&v));
    let st = r.node.stats(stats_req(&v.id, &staging)).await.unwrap();
    let c = st.volume_condition.unwrap();
    assert!(c.abnormal);
    assert!(c.message.contains("missing"), "{}", c.message);
    assert!(st.usage.is_empty());
}

#[test]
fn ephemeral_request_maps_attributes() {
    let ctx: HashMap<String, String> = [
        ("size", "2Gi"),
        ("eraseAfter", "false"),
        (EPHEMERAL_KEY, "true"),
        ("csi.storage.k8s.io/pod.name", "p"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let c = ephemeral_request("csi-1", &ctx, FsType::Xfs).unwrap();
    assert_eq!(c.name, "csi-1");
    assert_eq!(c.required, Bytes::gib(2));
    assert!(!c.erase_after);
    assert_eq!(c.usage, Usage::AppDirect);
    assert_eq!(c.persistency, Persistency::Ephemeral);
    assert_eq!(c.context.len(), 1);
    assert_eq!(c.parameters.get("eraseAfter").unwrap(), "false");
}

#[tokio::test]
async fn unknown_volumes_are_not_found_whatever_the_path() {
    let r = Rig::new();
    // csi-sanity: an unknown id with a relative path is NOT_FOUND.
    let mut st = stats_req("no-such-volume", Path::new("x"));
    st.volume_path = "some/path".into();
    assert_fails(r.node.stats(st).await, Code::NotFound, "no-such-volume");
    let mut ex = expand_req("no-such-volume", Path::new("x"), None, MIB);
    ex.volume_path = "some/path".into();
    assert_fails(r.node.expand(ex).await, Code::NotFound, "no-such-volume");
    // csi-sanity: a known volume at a relative path is not there (NOT_FOUND,
    // naming the path); a missing path is the client's mistake whatever the
    // volume.
    let v = r.create("known", 512);
    let mut st = stats_req(&v.id, Path::new("x"));
    st.volume_path = "some/path".into();
    assert_fails(r.node.stats(st).await, Code::NotFound, "volume_path");
    let mut st = stats_req("no-such-volume", Path::new("x"));
    st.volume_path = String::new();
    assert_fails(r.node.stats(st).await, Code::InvalidArgument, "volume_path");
}

#[tokio::test]
async fn oversized_fields_are_invalid_with_bounded_messages() {
    let r = Rig::new();
    let big = "v".repeat(3 << 20);
    let e = r
        .node
        .stage(stage_req(&big, &r.path("staging/x"), xfs()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let m = e.to_string();
    assert!(
        m.len() < 400 && m.contains("volume_id") && m.contains("3145728 bytes"),
        "{m}"
    );
    let e = r
        .node
        .publish(ephemeral_req("e1", &r.path("pods/a/v"), &[("size", &big)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
}

#[tokio::test]
async fn one_lock_orders_controller_and_node_calls() {
    use crate::csi::controller::ControllerService;
    use pmem_proto::csi::controller_server::Controller;
    let r = Rig::new();
    let ctl = ControllerService::new(Arc::clone(&r.driver));
    let v = r.create("locked", 512);
    let held = r.node.begin(&v.id).unwrap();
    let del = || {
        tonic::Request::new(csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        })
    };
    let st = ctl.delete_volume(del()).await.unwrap_err();
    assert_eq!(st.code(), Code::Aborted, "{st:?}");
    let st = ctl
        .controller_expand_volume(tonic::Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: v.id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Aborted, "{st:?}");
    // The node's own calls wait their turn the same way.
    assert_fails(
        r.node
            .stage(stage_req(&v.id, &r.path("staging/l"), xfs()))
            .await,
        Code::Aborted,
        "in progress",
    );
    drop(held);
    r.node
        .stage(stage_req(&v.id, &r.path("staging/l"), xfs()))
        .await
        .unwrap();
    // Under the lock, DeleteVolume sees the staging record and refuses.
    let st = ctl.delete_volume(del()).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("stage"), "{st:?}");
    r.node
        .unstage(unstage_req(&v.id, &r.path("staging/l")))
        .await
        .unwrap();
    ctl.delete_volume(del()).await.unwrap();
    // Deleted: gone, or left to the background eraser.
    assert!(
        r.driver
            .alloc
            .volume(&v.id)
            .unwrap()
            .is_none_or(|v| v.state == pmem_allocator::VolumeState::Erasing)
    );
}

#[tokio::test]
async fn collection_skips_volumes_with_a_call_in_flight() {
    let r = Rig::new();
    let t = r.path("pods/a/v");
    r.node
        .publish(ephemeral_req("busy", &t, &[("size", "512Mi")]))
        .await
        .unwrap();
    // The pod's mount is gone, but a publish of it is in flight.
    r.host.state().mounts.clear();
    let held = r.node.begin("busy").unwrap();
    let host: &dyn Host = r.host.as_ref();
    let rep = collect_ephemeral(&r.driver, host, false).await;
    assert!(rep.deleted.is_empty(), "{rep:?}");
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
    assert!(r.driver.alloc.volume_by_name("busy").unwrap().is_some());
    drop(held);
    // A dry run reports and keeps it.
    let rep = collect_ephemeral(&r.driver, host, true).await;
    assert_eq!(rep.deleted.len(), 1, "{rep:?}");
    assert!(r.driver.alloc.volume_by_name("busy").unwrap().is_some());
    let rep = collect_ephemeral(&r.driver, host, false).await;
    assert_eq!(rep.deleted.len(), 1, "{rep:?}");
    assert!(r.driver.alloc.volume_by_name("busy").unwrap().is_none());
    assert_eq!(r.driver.node_reconcile.history().len(), 1);
}

#[tokio::test]
async fn mount_scan_records_interrupted_mounts_and_reports_the_rest() {
    let r = Rig::new();
    let v = r.create("crashed", 512);
    let staging = r.path("plugins/kubernetes.io/csi/pmem-agent.csi/abc123/globalmount");
    let odd = r.path("elsewhere/m");
    r.host.mkfs(&r.dev(&v), FsType::Xfs).await.unwrap();
    for target in [&staging, &odd] {
        // As a daemon killed between mount and record left it.
        r.host.mount_raw(&r.dev(&v), target, "xfs");
    }
    let host: &dyn Host = r.host.as_ref();
    let dry = scan_mounts(&r.driver, host, true).await;
    assert_eq!(dry.recorded.len(), 1, "{dry:?}");
    assert!(r.pubs(&v).is_empty());
    let rep = scan_mounts(&r.driver, host, false).await;
    assert_eq!(rep.recorded.len(), 1, "{rep:?}");
    assert_eq!(rep.unrecorded.len(), 1, "{rep:?}");
    assert!(rep.unrecorded[0].contains("elsewhere"), "{rep:?}");
    assert_eq!(r.driver.node_reconcile.unrecorded(), rep.unrecorded);
    let pubs = r.pubs(&v);
    assert_eq!(pubs.len(), 1);
    assert!(recovered(&pubs[0]), "{pubs:?}");
    // Nothing was unmounted.
    assert_eq!(r.host.state().mounts.len(), 2);
    // Again: nothing new to record.
    let again = scan_mounts(&r.driver, host, false).await;
    assert!(again.recorded.is_empty(), "{again:?}");
    // The kubelet's retried stage adopts the record, then unstage works.
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    let pubs = r.pubs(&v);
    assert_eq!(pubs.len(), 1);
    assert!(!recovered(&pubs[0]), "{pubs:?}");
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    assert!(r.pubs(&v).is_empty());
}

#[test]
fn path_shapes_follow_the_kubelet_layout() {
    let root = Path::new("/var/lib/kubelet");
    let shape = |p: &str| path_shape(root, Path::new(p));
    assert_eq!(
        shape("/var/lib/kubelet/plugins/kubernetes.io/csi/pmem-agent.csi/0f1e/globalmount"),
        Some((PublicationKind::Stage, false))
    );
    assert_eq!(
        shape("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount"),
        Some((PublicationKind::Publish, false))
    );
    assert_eq!(
        shape("/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/uid"),
        Some((PublicationKind::Publish, true))
    );
    assert_eq!(shape("/var/lib/kubelet/pods/uid/volumes/x/mount"), None);
    assert_eq!(
        shape("/elsewhere/plugins/kubernetes.io/csi/d/h/globalmount"),
        None
    );
}

/// The fake backend, with devices that can be made busy (delete refused).
#[derive(Debug, Default)]
struct BusyBackend {
    busy: std::sync::atomic::AtomicBool,
}

impl Backend for BusyBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn describe(&self) -> String {
        "fake backend with busy devices".into()
    }
    fn regions(&self) -> AllocResult<Vec<RegionSpec>> {
        FakeBackend.regions()
    }
    fn check_idle(&self, req: &DeviceRequest) -> AllocResult<()> {
        if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(pmem_allocator::Error::FailedPrecondition(format!(
                "device of volume {} is in use",
                req.volume_id
            )));
        }
        Ok(())
    }
    fn create(&self, req: &DeviceRequest) -> AllocResult<Device> {
        FakeBackend.create(req)
    }
    fn find(&self, req: &DeviceRequest) -> AllocResult<Option<Device>> {
        FakeBackend.find(req)
    }
    fn destroy(&self, req: &DeviceRequest) -> AllocResult<()> {
        self.check_idle(req)
    }
    fn erase(
        &self,
        req: &DeviceRequest,
        progress: &mut dyn FnMut(u64) -> AllocResult<()>,
    ) -> AllocResult<()> {
        FakeBackend.erase(req, progress)
    }
    fn resize(&self, req: &DeviceRequest) -> AllocResult<Device> {
        FakeBackend.resize(req)
    }
    fn inventory(&self) -> AllocResult<Vec<InventoryItem>> {
        FakeBackend.inventory()
    }
    fn remove_orphan(&self, item: &InventoryItem) -> AllocResult<()> {
        FakeBackend.remove_orphan(item)
    }
}

/// A node service on [`BusyBackend`] whose collector runs every `interval`.
fn busy_rig(
    dir: &Path,
    interval: &str,
) -> (Arc<Driver>, NodeService, Arc<FakeHost>, Arc<BusyBackend>) {
    let state = dir.join("state");
    let root = dir.join("kubelet");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let cfg = Config::load(Args::parse_from([
        "pmem-agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--node-id",
        "n1",
        "--kubelet-root",
        root.to_str().unwrap(),
        "--ephemeral-collect-interval",
        interval,
    ]))
    .unwrap();
    let backend = Arc::new(BusyBackend::default());
    let alloc = Allocator::open(&cfg.ledger_path(), backend.clone()).unwrap();
    let store: Store = Arc::new(alloc);
    let driver = Arc::new(Driver::new(cfg, store, "fake", true));
    // As after start-up: the collector works only on a ready driver.
    driver.set_ready(true);
    let host = Arc::new(FakeHost::new());
    let node = NodeService::with_host(Arc::clone(&driver), host.clone());
    (driver, node, host, backend)
}

async fn wait_gone(driver: &Driver, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while driver.alloc.volume_by_name(name).unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "{name} not collected");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failed_inline_unpublish_is_retried_with_backoff_until_the_device_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    // No periodic pass within the test: only the kick and its retries.
    let (driver, node, host, backend) = busy_rig(&base, "3600");
    let collector = spawn_collector(&driver, host.clone());
    let target = base.join("kubelet/pods/a/v");
    node.publish(ephemeral_req("eph", &target, &[("size", "512Mi")]))
        .await
        .unwrap();
    backend
        .busy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let st = <NodeService as Node>::node_unpublish_volume(
        &node,
        Request::new(unpublish_req("eph", &target)),
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    // Still busy for a while: the collector keeps it and retries.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert!(driver.alloc.volume_by_name("eph").unwrap().is_some());
    backend
        .busy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_gone(&driver, "eph").await;
    // The pass that deleted it records it right after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !driver
        .node_reconcile
        .history()
        .iter()
        .any(|h| h.contains("deleted ephemeral inline volume"))
    {
        assert!(std::time::Instant::now() < deadline, "not in the history");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    collector.abort();
}

#[tokio::test]
async fn the_collection_runs_periodically() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let (driver, node, host, _backend) = busy_rig(&base, "1");
    let collector = spawn_collector(&driver, host.clone());
    let target = base.join("kubelet/pods/a/v");
    node.publish(ephemeral_req("eph", &target, &[("size", "512Mi")]))
        .await
        .unwrap();
    // The pod's mount vanished behind our back; nobody calls or kicks.
    host.state().mounts.clear();
    wait_gone(&driver, "eph").await;
    collector.abort();
}

#[tokio::test]
async fn unpublish_and_unstage_touch_only_recorded_publications() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("staging/pv");
    let target = r.path("pods/a/vol");
    // Someone's file and directory under the root: never removed.
    r.host.state().files.insert(r.path("pods/a/important.conf"));
    r.host.state().dirs.insert(r.path("pods/a/empty"));
    for p in ["pods/a/important.conf", "pods/a/empty"] {
        r.node
            .unpublish(unpublish_req(&v.id, &r.path(p)))
            .await
            .unwrap();
        r.node
            .unstage(unstage_req(&v.id, &r.path(p)))
            .await
            .unwrap();
    }
    assert!(r.host.calls("remove").is_empty() && r.host.calls("unmount").is_empty());
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    r.node
        .publish(publish_req(&v.id, &staging, &target, xfs(), false))
        .await
        .unwrap();
    // The publication's target, and only it, is unmounted and removed.
    r.node
        .unpublish(unpublish_req(&v.id, &target))
        .await
        .unwrap();
    assert_eq!(
        r.host.calls("remove"),
        vec![format!("remove {}", target.display())]
    );
    // Unstage unmounts and never removes the CO's staging directory.
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    assert!(r.host.mount_at(&staging).is_none());
    assert_eq!(r.host.calls("remove").len(), 1);
    assert!(r.host.state().dirs.contains(&staging));
    assert!(
        r.host
            .state()
            .files
            .contains(&r.path("pods/a/important.conf"))
    );
    assert!(r.pubs(&v).is_empty());
}

#[tokio::test]
async fn a_mount_is_never_unmounted_when_no_device_is_known() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let target = r.path("pods/a/vol");
    // A record from before devices were recorded, and the volume's device
    // is gone: nothing tells ours from foreign.
    r.driver
        .alloc
        .put_publication(&Publication {
            volume_id: v.id.clone(),
            kind: PublicationKind::Publish,
            path: target.display().to_string(),
            readonly: false,
            capability: "mount;xfs;SINGLE_NODE_WRITER".into(),
            device: None,
        })
        .unwrap();
    r.host.remove_device(&r.dev(&v));
    r.host.mount_raw(Path::new("tmpfs"), &target, "tmpfs");
    assert_fails(
        r.node.unpublish(unpublish_req(&v.id, &target)).await,
        Code::FailedPrecondition,
        "no device of volume",
    );
    assert!(r.host.mount_at(&target).is_some());
    assert_eq!(r.pubs(&v).len(), 1);
    // Gone by itself: the call succeeds and forgets the record.
    r.host.unmount_raw(&target);
    r.node
        .unpublish(unpublish_req(&v.id, &target))
        .await
        .unwrap();
    assert!(r.pubs(&v).is_empty());
}

/// One code per path mistake; the table in ARCHITECTURE.md ("Error codes").
#[tokio::test]
async fn path_error_codes_table() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let b = r.create("pvb", 512);
    let staging = r.path("staging/pv");
    let bstaging = r.path("staging/pvb");
    r.node
        .stage(stage_req(&b.id, &bstaging, block_cap()))
        .await
        .unwrap();
    r.host.state().symlinks.insert(r.path("link"));
    r.host.state().files.insert(r.path("a-file"));
    r.host.state().dirs.insert(r.path("a-dir"));
    r.host
        .mount_raw(Path::new("tmpfs"), &r.path("foreign"), "tmpfs");
    r.host.fail("option:no_such_option", "");
    let long = format!("{}/{}", r.path("").display(), "d/".repeat(2100));
    let outside = r.base.join("elsewhere/x");
    let flags = mount_cap("xfs", Mode::SingleNodeWriter, &["no_such_option"]);
    let st = |p: &str| stage_req(&v.id, Path::new(p), xfs());
    let kp = |p: &str| r.path(p).display().to_string();
    type Case = (&'static str, csi::NodeStageVolumeRequest, Code);
    let stage_cases: Vec<Case> = vec![
        ("relative path", st("staging/rel"), Code::InvalidArgument),
        ("longer than PATH_MAX", st(&long), Code::InvalidArgument),
        (
            "outside the root",
            st(outside.to_str().unwrap()),
            Code::InvalidArgument,
        ),
        (
            "through a symlink",
            st(&kp("link/s")),
            Code::InvalidArgument,
        ),
        (
            "mount_flags the kernel rejects",
            stage_req(&v.id, &staging, flags),
            Code::InvalidArgument,
        ),
        (
            "a file where a directory is needed",
            st(&kp("a-file")),
            Code::FailedPrecondition,
        ),
        (
            "a foreign mount at the path",
            st(&kp("foreign")),
            Code::FailedPrecondition,
        ),
    ];
    for (what, req, want) in stage_cases {
        let (code, msg) = fails(r.node.stage(req).await);
        assert_eq!(code, want, "{what}: {msg}");
        assert!(msg.len() < 400, "{what}: {} bytes", msg.len());
        assert!(r.pubs(&v).is_empty(), "{what}");
        assert!(r.host.mount_at(&staging).is_none(), "{what}");
    }
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    let publish_cases = vec![
        (
            "target_path equal to staging_target_path",
            publish_req(&v.id, &staging, &staging, xfs(), false),
            Code::InvalidArgument,
        ),
        (
            "publish through a symlink",
            publish_req(&v.id, &staging, &r.path("link/t"), xfs(), false),
            Code::InvalidArgument,
        ),
        (
            "a file where a directory is needed",
            publish_req(&v.id, &staging, &r.path("a-file"), xfs(), false),
            Code::FailedPrecondition,
        ),
        (
            "a directory where a file is needed",
            publish_req(&b.id, &bstaging, &r.path("a-dir"), block_cap(), false),
            Code::FailedPrecondition,
        ),
        (
            "a foreign mount at the target",
            publish_req(&v.id, &staging, &r.path("foreign"), xfs(), false),
            Code::FailedPrecondition,
        ),
    ];
    for (what, req, want) in publish_cases {
        let (code, msg) = fails(r.node.publish(req).await);
        assert_eq!(code, want, "{what}: {msg}");
        assert_eq!(r.pubs(&v).len(), 1, "{what}");
    }
    // A device in use (the kernel says EBUSY).
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
    let busy = format!("busy:{}", r.dev(&v).display());
    r.host.fail(&busy, "");
    let (code, msg) = fails(r.node.stage(stage_req(&v.id, &staging, xfs())).await);
    assert_eq!(code, Code::FailedPrecondition, "a device in use: {msg}");
    assert!(r.pubs(&v).is_empty());
    r.host.unfail(&busy);
    // Unpublish of a target not empty beneath the mount: OK, no record left.
    let target = r.path("pods/full/vol");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    r.node
        .publish(publish_req(&v.id, &staging, &target, xfs(), false))
        .await
        .unwrap();
    r.host.fail(&format!("not-empty:{}", target.display()), "");
    for _ in 0..2 {
        r.node
            .unpublish(unpublish_req(&v.id, &target))
            .await
            .unwrap();
    }
    assert!(r.host.mount_at(&target).is_none());
    assert_eq!(r.pubs(&v).len(), 1, "only the stage record is left");
    r.node.unstage(unstage_req(&v.id, &staging)).await.unwrap();
}

/// Deleted: gone, or left to the background eraser (its extent reserved).
fn deleted(r: &Rig, name: &str) -> bool {
    r.driver
        .alloc
        .volume_by_name(name)
        .unwrap()
        .is_none_or(|v| v.state == pmem_allocator::VolumeState::Erasing)
}

/// NodeGetVolumeStats and NodeExpandVolume resolve their paths beneath the
/// root without following symlinks, as stage and publish do: a symlinked
/// component is InvalidArgument even where the mount table by name would
/// have led to the volume, a path outside the root too, and an unknown
/// volume is NotFound before any path is judged.
#[tokio::test]
async fn stats_and_expand_resolve_paths_beneath_the_root() {
    let r = Rig::new();
    let v = r.create("pv", 512);
    let staging = r.path("plugins/st/pv");
    let target = r.path("pods/a/pv");
    r.node
        .stage(stage_req(&v.id, &staging, xfs()))
        .await
        .unwrap();
    r.node
        .publish(publish_req(&v.id, &staging, &target, xfs(), false))
        .await
        .unwrap();
    r.host.with_device(&r.dev(&v), |d| d.size = 2 << 30);
    // An ancestor of both recorded paths becomes a symlink.
    r.host.state().symlinks.insert(r.path("pods"));
    r.host.state().symlinks.insert(r.path("plugins"));
    assert_fails(
        r.node.stats(stats_req(&v.id, &target)).await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert_fails(
        r.node
            .expand(expand_req(&v.id, &target, None, 2 << 30))
            .await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert!(r.host.calls("grow").is_empty());
    r.host.state().symlinks.remove(&r.path("pods"));
    // The staging path given with the request: the same.
    assert_fails(
        r.node
            .expand(expand_req(&v.id, &target, Some(&staging), 2 << 30))
            .await,
        Code::InvalidArgument,
        "symbolic link",
    );
    // A recorded stage that cannot be reached is no candidate: the
    // read-write publish is grown.
    r.node
        .expand(expand_req(&v.id, &target, None, 2 << 30))
        .await
        .unwrap();
    assert_eq!(
        r.host.calls("grow"),
        vec![format!(
            "grow_online xfs {} {}",
            target.display(),
            2u64 << 30
        )]
    );
    r.host.state().symlinks.remove(&r.path("plugins"));
    // Outside the root.
    let outside = r.base.join("elsewhere/pv");
    assert_fails(
        r.node.stats(stats_req(&v.id, &outside)).await,
        Code::InvalidArgument,
        "not under the kubelet root",
    );
    assert_fails(
        r.node.expand(expand_req(&v.id, &outside, None, 0)).await,
        Code::InvalidArgument,
        "not under the kubelet root",
    );
    // An unknown volume is NotFound first, whatever the path.
    r.host.state().symlinks.insert(r.path("pods"));
    assert_fails(
        r.node.stats(stats_req("pmem-nope", &target)).await,
        Code::NotFound,
        "pmem-nope",
    );
    assert_fails(
        r.node
            .expand(expand_req("pmem-nope", &target, None, 0))
            .await,
        Code::NotFound,
        "pmem-nope",
    );
    r.host.state().symlinks.remove(&r.path("pods"));
    // The normal paths work.
    let st = r.node.stats(stats_req(&v.id, &target)).await.unwrap();
    assert_eq!(st.usage.len(), 2);
    assert!(!st.volume_condition.unwrap().message.contains("symbolic"));
    r.node.stats(stats_req(&v.id, &staging)).await.unwrap();
    r.host.with_device(&r.dev(&v), |d| d.size = 3 << 30);
    r.node
        .expand(expand_req(&v.id, &target, Some(&staging), 3 << 30))
        .await
        .unwrap();
    assert_eq!(
        r.host.calls("grow").last().unwrap(),
        &format!("grow_online xfs {} {}", staging.display(), 3u64 << 30)
    );
    // A recorded path whose mount was replaced by another device's: not
    // grown there, and the stats say so.
    r.host.unmount_raw(&target);
    r.host.mount_raw(Path::new("tmpfs"), &target, "tmpfs");
    let c = r
        .node
        .stats(stats_req(&v.id, &target))
        .await
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(
        c.abnormal && c.message.contains("another device"),
        "{}",
        c.message
    );
}

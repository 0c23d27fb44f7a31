//! The CSI Node service end to end: the real daemon on loop devices, real
//! mkfs.xfs/mkfs.ext4, real mounts. Runs as root (as CI does). Every path
//! the tests use lives under the daemon's temp dir, so the harness unmounts
//! whatever a failed test leaves behind.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Daemon;
use pmem_agent::mount::mountinfo::{self, MountEntry};
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::node_client::NodeClient;
use pmem_proto::csi::node_service_capability::{self, rpc};
use pmem_proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use pmem_proto::csi::volume_usage::Unit;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

fn xfs() -> csi::VolumeCapability {
    mount_cap("xfs", Mode::SingleNodeWriter)
}

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

fn block() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A path for kubelet-managed directories, beneath the daemon's kubelet root.
fn kpath(d: &Daemon, rel: &str) -> PathBuf {
    d.kpath(rel)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mounts() -> Vec<MountEntry> {
    mountinfo::parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()).unwrap()
}

fn mount_at(p: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == p)
}

fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[track_caller]
fn expect_code<T>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, needle: &str) {
    let (c, m) = code_of(r);
    assert_eq!(c, code, "message: {m}");
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
}

async fn create(
    c: &mut ControllerClient<Channel>,
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
    params: &[(&str, &str)],
) -> csi::Volume {
    c.create_volume(csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume
    .unwrap()
}

async fn delete(c: &mut ControllerClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: HashMap::new(),
    })
    .await
    .map(|_| ())
}

async fn expand_controller(
    c: &mut ControllerClient<Channel>,
    id: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::ControllerExpandVolumeResponse {
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn volume_names(c: &mut ControllerClient<Channel>) -> Vec<String> {
    c.list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
}

fn stage_req(id: &str, path: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(path),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unstage_req(id: &str, path: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(path),
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
        staging_target_path: s(staging),
        target_path: s(target),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
    }
}

fn stats_req(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: s(path),
        staging_target_path: String::new(),
    }
}

fn expand_req(
    id: &str,
    path: &Path,
    staging: Option<&Path>,
    bytes: i64,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: s(path),
        staging_target_path: staging.map(s).unwrap_or_default(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capability: None,
        secrets: HashMap::new(),
    }
}

fn ephemeral_req(id: &str, target: &Path, attrs: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ctx.insert(EPHEMERAL.into(), "true".into());
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
        volume_capability: Some(xfs()),
        volume_context: ctx,
        ..Default::default()
    }
}

async fn stats(
    n: &mut NodeClient<Channel>,
    id: &str,
    path: &Path,
) -> csi::NodeGetVolumeStatsResponse {
    n.node_get_volume_stats(stats_req(id, path))
        .await
        .unwrap()
        .into_inner()
}

fn usage_of(r: &csi::NodeGetVolumeStatsResponse, unit: Unit) -> csi::VolumeUsage {
    *r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {r:?}"))
}

fn statvfs_total(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks() * st.fragment_size()
}

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The device a mount entry's filesystem lives on (`/dev/loopN`).
fn device_of_mount(m: &MountEntry) -> PathBuf {
    PathBuf::from(&m.source)
}

#[tokio::test]
async fn node_e2e_xfs_stage_publish_expand_lifecycle() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;

    let caps: Vec<i32> = n
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for t in [
        rpc::Type::StageUnstageVolume,
        rpc::Type::GetVolumeStats,
        rpc::Type::VolumeCondition,
        rpc::Type::ExpandVolume,
        rpc::Type::SingleNodeMultiWriter,
    ] {
        assert!(caps.contains(&(t as i32)), "{t:?} missing from {caps:?}");
    }
    let info_before = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info_before.node_id, d.node_id);
    assert_eq!(
        info_before.accessible_topology.unwrap().segments["pmem-agent.csi/node"],
        d.node_id
    );

    let v = create(&mut c, "pv-xfs", 512 * MIB, xfs(), &[]).await;
    let id = v.volume_id.clone();
    let info_after = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info_after.max_volumes_per_node < info_before.max_volumes_per_node,
        "max_volumes_per_node is recomputed: {} then {}",
        info_before.max_volumes_per_node,
        info_after.max_volumes_per_node
    );

    let staging = kpath(&d, "plugins/staging/pv-xfs");
    let t_rw = kpath(&d, "pods/a/volumes/pv-xfs/mount");
    let t_ro = kpath(&d, "pods/b/volumes/pv-xfs/mount");

    // Publish before stage: the volume must be staged first.
    expect_code(
        n.node_publish_volume(publish_req(&id, &staging, &t_rw, xfs(), false))
            .await,
        Code::FailedPrecondition,
        "not staged",
    );

    n.node_stage_volume(stage_req(&id, &staging, xfs()))
        .await
        .unwrap();
    let m = mount_at(&staging).expect("staging path is mounted");
    assert_eq!(m.fs_type, "xfs");
    assert!(!m.dax(), "loop devices have no DAX: {:?}", m.super_options);
    let dev = device_of_mount(&m);
    assert!(
        std::fs::metadata(&dev)
            .unwrap()
            .file_type()
            .is_block_device(),
        "{}",
        dev.display()
    );
    // Laid out for 2 MiB pages: stripe unit 2 MiB, extent size hint 2 MiB.
    let info = run(&["xfs_info", &s(&staging)]);
    assert!(
        info.contains("sunit=512") && info.contains("reflink=0"),
        "{info}"
    );
    let hint = run(&["xfs_io", "-c", "extsize", &s(&staging)]);
    assert!(hint.contains("[2097152]"), "{hint}");
    // Idempotent; a different capability conflicts.
    n.node_stage_volume(stage_req(&id, &staging, xfs()))
        .await
        .unwrap();
    assert_eq!(
        mounts().iter().filter(|e| e.mount_point == staging).count(),
        1
    );
    expect_code(
        n.node_stage_volume(stage_req(&id, &staging, ext4())).await,
        Code::AlreadyExists,
        "already staged",
    );

    n.node_publish_volume(publish_req(&id, &staging, &t_rw, xfs(), false))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &t_rw, xfs(), false))
        .await
        .unwrap();
    expect_code(
        n.node_publish_volume(publish_req(&id, &staging, &t_rw, xfs(), true))
            .await,
        Code::AlreadyExists,
        "already published",
    );
    n.node_publish_volume(publish_req(&id, &staging, &t_ro, xfs(), true))
        .await
        .unwrap();
    std::fs::write(t_rw.join("hello.txt"), b"persistent hello").unwrap();
    assert_eq!(
        std::fs::read(t_ro.join("hello.txt")).unwrap(),
        b"persistent hello"
    );
    let e = std::fs::write(t_ro.join("nope.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(mount_at(&t_ro).unwrap().read_only());

    let st = stats(&mut n, &id, &t_rw).await;
    let bytes = usage_of(&st, Unit::Bytes);
    assert!(
        bytes.total > 400 * MIB && bytes.total <= 512 * MIB,
        "{bytes:?}"
    );
    assert!(bytes.used > 0 && bytes.available > 0 && bytes.available < bytes.total);
    let inodes = usage_of(&st, Unit::Inodes);
    assert!(inodes.total > 0 && inodes.used >= 2, "{inodes:?}");
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal, "AppDirect without DAX is reported");
    assert!(
        cond.message.contains("AppDirect requested but device")
            && cond.message.contains("mounted without dax"),
        "{}",
        cond.message
    );
    expect_code(
        n.node_get_volume_stats(stats_req(&id, &kpath(&d, "pods/zzz")))
            .await,
        Code::NotFound,
        "not a staging or publish path",
    );

    expect_code(
        delete(&mut c, &id).await.map(tonic::Response::new),
        Code::FailedPrecondition,
        "unpublish and unstage",
    );
    expect_code(
        n.node_unstage_volume(unstage_req(&id, &staging)).await,
        Code::FailedPrecondition,
        "still published",
    );

    for t in [&t_rw, &t_ro] {
        n.node_unpublish_volume(unpublish_req(&id, t))
            .await
            .unwrap();
        assert!(mount_at(t).is_none());
        assert!(!t.exists(), "target {} removed", t.display());
        n.node_unpublish_volume(unpublish_req(&id, t))
            .await
            .unwrap();
    }
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(mount_at(&staging).is_none());
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();

    // Staged again: same filesystem, data intact, no reformat.
    n.node_stage_volume(stage_req(&id, &staging, xfs()))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"persistent hello"
    );
    n.node_publish_volume(publish_req(&id, &staging, &t_rw, xfs(), false))
        .await
        .unwrap();

    // Online growth: controller grows the device, the node the filesystem.
    let before = statvfs_total(&t_rw);
    let ce = expand_controller(&mut c, &id, 768 * MIB, xfs()).await;
    assert!(ce.node_expansion_required);
    assert_eq!(ce.capacity_bytes, 768 * MIB);
    expect_code(
        n.node_expand_volume(expand_req(&id, &t_rw, Some(&staging), 1024 * MIB))
            .await,
        Code::OutOfRange,
        "ControllerExpandVolume",
    );
    let ne = n
        .node_expand_volume(expand_req(&id, &t_rw, Some(&staging), 768 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ne.capacity_bytes, 768 * MIB);
    let after = statvfs_total(&t_rw);
    assert!(
        after > before + 200 * (MIB as u64),
        "xfs grew from {before} to {after}"
    );
    // Repeating it is harmless.
    n.node_expand_volume(expand_req(&id, &t_rw, Some(&staging), 768 * MIB))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(t_rw.join("hello.txt")).unwrap(),
        b"persistent hello"
    );

    n.node_unpublish_volume(unpublish_req(&id, &t_rw))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    delete(&mut c, &id).await.unwrap();
    assert!(volume_names(&mut c).await.is_empty());
}

#[tokio::test]
async fn node_e2e_ext4_grows_offline_when_staged_again() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    // FileIO: no DAX wanted, so the condition is clean.
    let v = create(&mut c, "pv-ext4", 256 * MIB, ext4(), &[("usage", "FileIO")]).await;
    let id = v.volume_id.clone();
    let staging = kpath(&d, "plugins/staging/pv-ext4");
    let target = kpath(&d, "pods/a/volumes/pv-ext4/mount");

    n.node_stage_volume(stage_req(&id, &staging, ext4()))
        .await
        .unwrap();
    let m = mount_at(&staging).unwrap();
    assert_eq!(m.fs_type, "ext4");
    let dev = device_of_mount(&m);
    let sb = run(&["dumpe2fs", "-h", &s(&dev)]);
    assert!(
        sb.contains("RAID stride:              512")
            && sb.contains("RAID stripe width:        512")
            && sb.contains("Block size:               4096"),
        "{sb}"
    );
    n.node_publish_volume(publish_req(&id, &staging, &target, ext4(), false))
        .await
        .unwrap();
    std::fs::write(target.join("data.bin"), vec![7u8; 1 << 20]).unwrap();
    let st = stats(&mut n, &id, &target).await;
    let cond = st.volume_condition.clone().unwrap();
    assert!(!cond.abnormal, "{}", cond.message);
    let small = usage_of(&st, Unit::Bytes).total;
    assert!(small < 256 * MIB, "{small}");

    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    let ce = expand_controller(&mut c, &id, 512 * MIB, ext4()).await;
    assert_eq!(ce.capacity_bytes, 512 * MIB);
    assert!(ce.node_expansion_required);
    // Staging grows the unmounted filesystem before mounting it.
    n.node_stage_volume(stage_req(&id, &staging, ext4()))
        .await
        .unwrap();
    let grown = statvfs_total(&staging);
    assert!(
        grown > 400 * (MIB as u64),
        "ext4 is {grown} bytes after restage"
    );
    assert_eq!(
        std::fs::read(staging.join("data.bin")).unwrap(),
        vec![7u8; 1 << 20]
    );
    // Nothing left for NodeExpandVolume.
    let ne = n
        .node_expand_volume(expand_req(&id, &staging, None, 512 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ne.capacity_bytes, 512 * MIB);

    // Grown while mounted: online ext4 resize needs CAP_SYS_RESOURCE. Where
    // the node has it the filesystem grows; where not, a clear error says
    // how to get there (unstage + stage).
    expand_controller(&mut c, &id, 640 * MIB, ext4()).await;
    match code_of(
        n.node_expand_volume(expand_req(&id, &staging, None, 640 * MIB))
            .await,
    ) {
        (Code::Ok, _) => assert!(statvfs_total(&staging) > grown),
        (Code::FailedPrecondition, m) => {
            assert!(m.contains("online") && m.contains("unstage"), "{m}");
            eprintln!("online ext4 growth refused on this node: {m}");
            n.node_unstage_volume(unstage_req(&id, &staging))
                .await
                .unwrap();
            n.node_stage_volume(stage_req(&id, &staging, ext4()))
                .await
                .unwrap();
            assert!(statvfs_total(&staging) > grown);
        }
        (code, m) => panic!("unexpected {code:?}: {m}"),
    }
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();

    // The device has ext4 now: never reformatted as something else.
    expect_code(
        n.node_stage_volume(stage_req(&id, &staging, xfs())).await,
        Code::FailedPrecondition,
        "refusing to reformat",
    );
    assert!(mount_at(&staging).is_none());
    delete(&mut c, &id).await.unwrap();

    // Too small for xfs: refused with the minimum named. (CreateVolume
    // rounds an xfs claim up to the minimum; this one was made for ext4.)
    let tiny = create(&mut c, "pv-tiny", 64 * MIB, ext4(), &[]).await;
    expect_code(
        n.node_stage_volume(stage_req(&tiny.volume_id, &staging, xfs()))
            .await,
        Code::FailedPrecondition,
        "300MiB",
    );
    delete(&mut c, &tiny.volume_id).await.unwrap();
}

#[tokio::test]
async fn node_e2e_block_volume_pattern_round_trip() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = create(&mut c, "pv-block", 64 * MIB, block(), &[]).await;
    let id = v.volume_id.clone();
    let staging = kpath(&d, "plugins/volumeDevices/staging/pv-block");
    let target = kpath(&d, "plugins/volumeDevices/publish/pv-block/pod-a");

    n.node_stage_volume(stage_req(&id, &staging, block()))
        .await
        .unwrap();
    assert!(mount_at(&staging).is_none(), "block staging mounts nothing");
    n.node_stage_volume(stage_req(&id, &staging, block()))
        .await
        .unwrap();
    expect_code(
        n.node_publish_volume(publish_req(&id, &staging, &target, xfs(), false))
            .await,
        Code::FailedPrecondition,
        "block access",
    );
    n.node_publish_volume(publish_req(&id, &staging, &target, block(), false))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&id, &staging, &target, block(), false))
        .await
        .unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(meta.file_type().is_block_device());
    assert!(mount_at(&target).is_some());

    // A pattern written through the published node reads back.
    let pattern: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    {
        let mut f = std::fs::File::open(&target).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        let mut back = vec![0u8; pattern.len()];
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern, "pattern differs after read-back");
    }

    let st = stats(&mut n, &id, &target).await;
    assert_eq!(usage_of(&st, Unit::Bytes).total, 64 * MIB);
    assert!(!st.volume_condition.unwrap().abnormal);

    // Block expansion: the device grows, the node just reports it.
    let ce = expand_controller(&mut c, &id, 128 * MIB, block()).await;
    assert!(!ce.node_expansion_required);
    let ne = n
        .node_expand_volume(expand_req(&id, &target, Some(&staging), 128 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ne.capacity_bytes, 128 * MIB);
    assert_eq!(
        pmem_allocator::loopdev::block_size_bytes(&target)
            .unwrap()
            .0,
        128 << 20
    );
    {
        let mut f = std::fs::File::open(&target).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        let mut back = vec![0u8; pattern.len()];
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern, "pattern survives the expansion");
    }

    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(mount_at(&target).is_none());
    assert!(!target.exists());
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    delete(&mut c, &id).await.unwrap();
}

#[tokio::test]
async fn node_e2e_ephemeral_inline_volumes() {
    let mut d = Daemon::start(&["--sim-region-size", "2GiB"]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let pod = [
        ("size", "512Mi"),
        ("csi.storage.k8s.io/pod.name", "web-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "0b1f"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ];
    let t1 = kpath(&d, "pods/0b1f/volumes/kubernetes.io~csi/scratch/mount");

    n.node_publish_volume(ephemeral_req("csi-e2e-1", &t1, &pod))
        .await
        .unwrap();
    let m = mount_at(&t1).expect("mounted at the target");
    assert_eq!(m.fs_type, "xfs");
    std::fs::write(t1.join("scratch"), b"tmp").unwrap();
    // Repeated: same volume, same mount.
    n.node_publish_volume(ephemeral_req("csi-e2e-1", &t1, &pod))
        .await
        .unwrap();
    assert_eq!(mounts().iter().filter(|e| e.mount_point == t1).count(), 1);
    assert_eq!(volume_names(&mut c).await.len(), 1);
    let st = stats(&mut n, "csi-e2e-1", &t1).await;
    assert!(usage_of(&st, Unit::Bytes).total > 400 * MIB);
    n.node_unpublish_volume(unpublish_req("csi-e2e-1", &t1))
        .await
        .unwrap();
    assert!(mount_at(&t1).is_none());
    assert!(
        volume_names(&mut c).await.is_empty(),
        "deleted on unpublish"
    );
    n.node_unpublish_volume(unpublish_req("csi-e2e-1", &t1))
        .await
        .unwrap();

    // Bad attributes and no space: exact codes, nothing created.
    let t = kpath(&d, "pods/x/volumes/kubernetes.io~csi/bad/mount");
    expect_code(
        n.node_publish_volume(ephemeral_req("csi-bad", &t, &[]))
            .await,
        Code::InvalidArgument,
        "size",
    );
    expect_code(
        n.node_publish_volume(ephemeral_req("csi-bad", &t, &[("size", "2 apples")]))
            .await,
        Code::InvalidArgument,
        "size",
    );
    expect_code(
        n.node_publish_volume(ephemeral_req(
            "csi-bad",
            &t,
            &[("size", "1Gi"), ("usage", "dax")],
        ))
        .await,
        Code::InvalidArgument,
        "usage",
    );
    expect_code(
        n.node_publish_volume(ephemeral_req("csi-bad", &t, &[("size", "64Gi")]))
            .await,
        Code::ResourceExhausted,
        "not enough space",
    );
    let mut blk = ephemeral_req("csi-bad", &t, &[("size", "1Gi")]);
    blk.volume_capability = Some(block());
    expect_code(
        n.node_publish_volume(blk).await,
        Code::InvalidArgument,
        "block",
    );
    assert!(volume_names(&mut c).await.is_empty());

    // Start-up collects an ephemeral volume whose mount vanished while the
    // daemon was down, and keeps one that is still mounted.
    let t2 = kpath(&d, "pods/p2/volumes/kubernetes.io~csi/scratch/mount");
    let t3 = kpath(&d, "pods/p3/volumes/kubernetes.io~csi/scratch/mount");
    n.node_publish_volume(ephemeral_req("csi-e2e-2", &t2, &pod))
        .await
        .unwrap();
    n.node_publish_volume(ephemeral_req("csi-e2e-3", &t3, &pod))
        .await
        .unwrap();
    assert_eq!(volume_names(&mut c).await.len(), 2);
    let status = d.stop();
    assert!(status.success(), "{status}");
    nix::mount::umount2(&t2, nix::mount::MntFlags::MNT_DETACH).unwrap();
    d.spawn().await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    assert_eq!(volume_names(&mut c).await.len(), 1, "log:\n{}", d.log());
    assert!(
        d.log().contains("deleting ephemeral inline volume"),
        "{}",
        d.log()
    );
    let st = stats(&mut n, "csi-e2e-3", &t3).await;
    assert!(usage_of(&st, Unit::Bytes).total > 0);
    expect_code(
        n.node_get_volume_stats(stats_req("csi-e2e-2", &t2)).await,
        Code::NotFound,
        "does not exist",
    );
    n.node_unpublish_volume(unpublish_req("csi-e2e-3", &t3))
        .await
        .unwrap();
    assert!(volume_names(&mut c).await.is_empty());
}

#[tokio::test]
async fn node_e2e_errors_and_concurrent_repeats() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = create(&mut c, "pv-err", 512 * MIB, xfs(), &[]).await;
    let id = v.volume_id.clone();
    let staging = kpath(&d, "plugins/staging/pv-err");
    let target = kpath(&d, "pods/a/volumes/pv-err/mount");

    let mut r = stage_req(&id, &staging, xfs());
    r.volume_id.clear();
    expect_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "volume_id is required",
    );
    let mut r = stage_req(&id, &staging, xfs());
    r.staging_target_path = "relative/path".into();
    expect_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "absolute",
    );
    let mut r = stage_req(&id, &staging, xfs());
    r.staging_target_path = format!("{}/../escape", s(&staging));
    expect_code(n.node_stage_volume(r).await, Code::InvalidArgument, "..");
    let mut r = stage_req(&id, &staging, xfs());
    r.volume_capability = None;
    expect_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "volume_capability is required",
    );
    expect_code(
        n.node_stage_volume(stage_req(
            &id,
            &staging,
            mount_cap("xfs", Mode::MultiNodeMultiWriter),
        ))
        .await,
        Code::InvalidArgument,
        "MULTI_NODE_MULTI_WRITER",
    );
    expect_code(
        n.node_stage_volume(stage_req("pmem-missing", &staging, xfs()))
            .await,
        Code::NotFound,
        "pmem-missing",
    );
    let mut r = publish_req(&id, &staging, &target, xfs(), false);
    r.staging_target_path.clear();
    expect_code(
        n.node_publish_volume(r).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    let mut r = publish_req(&id, &staging, &target, xfs(), false);
    r.target_path.clear();
    expect_code(
        n.node_publish_volume(r).await,
        Code::InvalidArgument,
        "target_path is required",
    );
    expect_code(
        n.node_get_volume_stats(stats_req("pmem-missing", &staging))
            .await,
        Code::NotFound,
        "does not exist",
    );
    let mut r = expand_req(&id, &staging, None, 0);
    r.volume_path.clear();
    expect_code(
        n.node_expand_volume(r).await,
        Code::InvalidArgument,
        "volume_path is required",
    );
    // Unknown volumes and paths that are not mounted: OK.
    n.node_unpublish_volume(unpublish_req("pmem-missing", &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req("pmem-missing", &staging))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();

    // The same stage four times at once: each succeeds or is told to retry
    // (ABORTED); one mount results and the next repeat succeeds.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut n = n.clone();
            let r = stage_req(&id, &staging, xfs());
            tokio::spawn(async move { code_of(n.node_stage_volume(r).await) })
        })
        .collect();
    let mut results = Vec::new();
    for h in calls {
        results.push(h.await.unwrap());
    }
    assert!(
        results
            .iter()
            .all(|(c, _)| *c == Code::Ok || *c == Code::Aborted),
        "{results:?}"
    );
    n.node_stage_volume(stage_req(&id, &staging, xfs()))
        .await
        .unwrap();
    assert_eq!(
        mounts().iter().filter(|e| e.mount_point == staging).count(),
        1
    );
    // A mount of something else at the target is never replaced.
    std::fs::create_dir_all(&target).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    expect_code(
        n.node_publish_volume(publish_req(&id, &staging, &target, xfs(), false))
            .await,
        Code::FailedPrecondition,
        "another device",
    );
    // Not published there by us: OK, and the foreign mount stays.
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(mounts().iter().any(|e| e.mount_point == target));
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    delete(&mut c, &id).await.unwrap();
}

#[tokio::test]
async fn node_e2e_file_only_mode_and_kubelet_root() {
    // Without block devices nothing can be staged; the message says why.
    let d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = create(&mut c, "pv-nodev", 512 * MIB, xfs(), &[]).await;
    expect_code(
        n.node_stage_volume(stage_req(&v.volume_id, &kpath(&d, "staging/x"), xfs()))
            .await,
        Code::FailedPrecondition,
        "no block device",
    );
    drop(d);

    // With a kubelet root, paths outside it are refused.
    let d = Daemon::start(&["--kubelet-root", "/var/lib/kubelet-pmem-e2e-unused"]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = create(&mut c, "pv-root", 512 * MIB, xfs(), &[]).await;
    expect_code(
        n.node_stage_volume(stage_req(
            &v.volume_id,
            &d.dir.path().join("staging/x"),
            xfs(),
        ))
        .await,
        Code::InvalidArgument,
        "kubelet root",
    );
    expect_code(
        n.node_publish_volume(ephemeral_req(
            "csi-out",
            &d.dir.path().join("pods/x"),
            &[("size", "1Gi")],
        ))
        .await,
        Code::InvalidArgument,
        "kubelet root",
    );
    assert_eq!(volume_names(&mut c).await.len(), 1);
}

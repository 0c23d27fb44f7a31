//! Hostile lifecycle tests against the real daemon (root, loop devices,
//! real mkfs and mounts): concurrent storms on a few volumes, a crash
//! between mount and record, conformance error codes, megabyte fields,
//! filesystem minimums and the collection of inline volumes whose unpublish
//! failed. Every path lives under the daemon's temp dir (its kubelet root),
//! so the harness unmounts whatever a failed test leaves behind.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Daemon;
use common::util::{free_port, get_volume, metric, mount_cap, mounts, reconcile_report, s};
use pmem_agent::mount::mountinfo::MountEntry;
use pmem_proto::admin;
use pmem_proto::csi;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn mounted_at(p: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == p)
}

fn code<T>(r: &Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn volumes(d: &Daemon) -> Vec<admin::Volume> {
    d.admin()
        .await
        .list_volumes(admin::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
}

fn create_req(name: &str, bytes: i64, limit: i64, fs: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![mount_cap(fs, &[])],
        ..Default::default()
    }
}

fn stage_req(id: &str, staging: &Path, fs: &str) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        volume_capability: Some(mount_cap(fs, &[])),
        ..Default::default()
    }
}

fn publish_req(id: &str, staging: &Path, target: &Path, fs: &str) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        target_path: s(target),
        volume_capability: Some(mount_cap(fs, &[])),
        ..Default::default()
    }
}

/// A tiny deterministic generator (xorshift); the seed is printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Mixed create/stage/publish/unpublish/unstage/delete calls on a few
/// volumes from many clients at once, bounded in count and time. After it,
/// every mount of ours has a ledger record, and no conflict between
/// clients was answered with Internal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_storm_leaves_no_mount_without_a_record() {
    let d = Arc::new(Daemon::start(&[]).await);
    let names: Vec<String> = (0..3).map(|i| format!("storm-{i}")).collect();
    let ids: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("storm seed {seed}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let d = Arc::clone(&d);
        let names = names.clone();
        let ids = Arc::clone(&ids);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
            let mut ctl = d.controller().await;
            let mut node = d.node().await;
            let mut codes: HashMap<(String, Code), usize> = HashMap::new();
            let mut bad = Vec::new();
            for _ in 0..1500 {
                if Instant::now() > deadline {
                    break;
                }
                // Jitter, so calls overlap in every phase of each other.
                tokio::time::sleep(Duration::from_millis(rng.next(25))).await;
                let name = &names[rng.next(names.len() as u64) as usize];
                let id = ids.lock().unwrap().get(name).cloned();
                let staging = d.staging_of(name);
                let target = d.target_of(&format!("pod-{name}"), name);
                let id = match (id, rng.next(6)) {
                    (None, _) | (_, 0) => {
                        let r = ctl
                            .create_volume(create_req(name, 32 * MIB, 0, "ext4"))
                            .await;
                        if let Ok(r) = &r {
                            let v = r.get_ref().volume.clone().unwrap();
                            ids.lock().unwrap().insert(name.clone(), v.volume_id);
                        }
                        let c = code(&r);
                        *codes.entry(("create".into(), c)).or_default() += 1;
                        if let Err(e) = r
                            && matches!(
                                e.code(),
                                Code::Internal | Code::Unknown | Code::Unavailable
                            )
                        {
                            bad.push(format!("create {name}: {e:?}"));
                        }
                        continue;
                    }
                    (Some(id), _) => id,
                };
                let (op, r): (&str, Result<(), tonic::Status>) = match rng.next(5) {
                    0 => (
                        "stage",
                        node.node_stage_volume(stage_req(&id, &staging, "ext4"))
                            .await
                            .map(|_| ()),
                    ),
                    1 => (
                        "publish",
                        node.node_publish_volume(publish_req(&id, &staging, &target, "ext4"))
                            .await
                            .map(|_| ()),
                    ),
                    2 => (
                        "unpublish",
                        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                            volume_id: id.clone(),
                            target_path: s(&target),
                        })
                        .await
                        .map(|_| ()),
                    ),
                    3 => (
                        "unstage",
                        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                            volume_id: id.clone(),
                            staging_target_path: s(&staging),
                        })
                        .await
                        .map(|_| ()),
                    ),
                    _ => (
                        "delete",
                        ctl.delete_volume(csi::DeleteVolumeRequest {
                            volume_id: id.clone(),
                            secrets: HashMap::new(),
                        })
                        .await
                        .map(|_| ()),
                    ),
                };
                *codes.entry((op.into(), code(&r))).or_default() += 1;
                if let Err(e) = r
                    && matches!(
                        e.code(),
                        Code::Internal
                            | Code::Unknown
                            | Code::Unavailable
                            | Code::ResourceExhausted
                    )
                {
                    bad.push(format!("{op} {name} ({id}): {e:?}"));
                }
            }
            (codes, bad)
        }));
    }
    let mut all: HashMap<(String, Code), usize> = HashMap::new();
    let mut bad = Vec::new();
    for w in workers {
        let (codes, b) = w.await.unwrap();
        for (k, n) in codes {
            *all.entry(k).or_default() += n;
        }
        bad.extend(b);
    }
    let mut summary: Vec<_> = all.iter().collect();
    summary.sort_by_key(|((op, c), _)| (op.clone(), format!("{c:?}")));
    println!("storm calls: {summary:?}");
    let total: usize = all.values().sum();
    assert!(total > 100, "the storm made only {total} calls");
    assert!(
        all.iter()
            .any(|((op, c), _)| op == "stage" && *c == Code::Ok),
        "no stage succeeded: {summary:?}"
    );
    assert!(
        bad.is_empty(),
        "client conflicts answered as server errors:\n{}",
        bad.join("\n")
    );

    // Every mount under the kubelet root is a publication the ledger holds.
    let vols = volumes(&d).await;
    let recorded: Vec<PathBuf> = vols
        .iter()
        .flat_map(|v| v.publications.iter().map(|p| PathBuf::from(&p.path)))
        .collect();
    let kroot = d.kubelet_root();
    let ours: Vec<MountEntry> = mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&kroot))
        .collect();
    let unrecorded: Vec<&MountEntry> = ours
        .iter()
        .filter(|m| !recorded.contains(&m.mount_point))
        .collect();
    assert!(
        unrecorded.is_empty(),
        "mounts without a ledger record: {unrecorded:#?}\nledger: {vols:#?}"
    );
    // None is stuck half-created or half-deleted (an erasing one is on its
    // way out in the background).
    for v in &vols {
        assert!(v.state == "ready" || v.state == "erasing", "{v:?}");
    }
    let vols: Vec<admin::Volume> = vols.into_iter().filter(|v| v.state == "ready").collect();

    // Tear down through the API: everything unwinds cleanly.
    let mut ctl = d.controller().await;
    let mut node = d.node().await;
    for v in &vols {
        let target = d.target_of(&format!("pod-{}", v.name), &v.name);
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            target_path: s(&target),
        })
        .await
        .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: s(&d.staging_of(&v.name)),
        })
        .await
        .unwrap();
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    assert!(!volumes(&d).await.iter().any(|v| v.state == "ready"));
    assert!(!mounts().iter().any(|m| m.mount_point.starts_with(&kroot)));
}

/// kill -9 between the mount and the record of a NodeStageVolume: the mount
/// is there, the ledger does not know it. The next start records it (it
/// has a staging path's shape) and reports a mount it cannot place; a
/// retried NodeStageVolume and NodeUnstageVolume then work.
#[tokio::test]
async fn hostile_crash_between_mount_and_record_is_recovered_at_start() {
    let port = free_port();
    let mut d = Daemon::start(&["--metrics-address", &format!("127.0.0.1:{port}")]).await;
    let mut ctl = d.controller().await;
    let v = ctl
        .create_volume(create_req("crashed", 64 * MIB, 0, "ext4"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let info = get_volume(&d, &v.volume_id).await.unwrap();
    let dev = PathBuf::from(&info.device);
    d.kill();
    // What the interrupted stage did: mkfs and mount, no record.
    let staging = d.staging_of("crashed");
    let odd = d.kubelet_root().join("somewhere/else");
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev)
        .status()
        .unwrap();
    assert!(st.success());
    for p in [&staging, &odd] {
        std::fs::create_dir_all(p).unwrap();
        nix::mount::mount(
            Some(&dev),
            p.as_path(),
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
    }
    d.spawn().await;
    let info = get_volume(&d, &v.volume_id).await.unwrap();
    assert_eq!(info.publications.len(), 1, "{info:?}");
    assert_eq!(info.publications[0].kind, "stage");
    assert_eq!(PathBuf::from(&info.publications[0].path), staging);
    let rep = reconcile_report(&d).await;
    assert!(
        rep.node_history
            .iter()
            .any(|h| h.contains("recorded") && h.contains(&s(&staging))),
        "{rep:?}"
    );
    assert!(
        rep.unrecorded_mounts.iter().any(|m| m.contains(&s(&odd))),
        "{rep:?}"
    );
    assert!(d.log().contains("no publication record"), "{}", d.log());
    // Reported, never unmounted.
    assert!(mounted_at(&odd) && mounted_at(&staging));
    assert_eq!(metric(port, "pmem_agent_mounts_recovered_total").await, 1.0);
    assert_eq!(metric(port, "pmem_agent_mounts_unrecorded").await, 1.0);
    // While it is staged (recorded), DeleteVolume refuses.
    let mut ctl = d.controller().await;
    let e = ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await;
    assert_eq!(code(&e), Code::FailedPrecondition, "{e:?}");
    // The kubelet's retry of the stage and the unstage work.
    let mut node = d.node().await;
    node.node_stage_volume(stage_req(&v.volume_id, &staging, "ext4"))
        .await
        .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: s(&staging),
    })
    .await
    .unwrap();
    assert!(!mounted_at(&staging));
    nix::mount::umount(odd.as_path()).unwrap();
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
}

/// csi-sanity's cases: an unknown volume is NOT_FOUND before its path is
/// judged.
#[tokio::test]
async fn hostile_unknown_volume_is_not_found_before_the_path_is_judged() {
    let d = Daemon::start(&[]).await;
    let mut node = d.node().await;
    let e = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "no-such-volume".into(),
            volume_path: "some/path".into(),
            staging_target_path: String::new(),
        })
        .await;
    assert_eq!(code(&e), Code::NotFound, "{e:?}");
    let e = node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "no-such-volume".into(),
            volume_path: "some/path".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&e), Code::NotFound, "{e:?}");
}

/// Megabyte fields: InvalidArgument quoting a bounded prefix, and a bounded
/// log line (no ResourceExhausted from the client's metadata limit).
#[tokio::test]
async fn hostile_megabyte_fields_are_invalid_with_bounded_echoes() {
    let d = Daemon::start(&[]).await;
    let big = "x".repeat(3 << 20);
    let mut ctl = d.controller().await;
    let mut node = d.node().await;
    let mut statuses = Vec::new();
    statuses.push((
        "CreateVolume name",
        ctl.create_volume(create_req(&big, 64 * MIB, 0, "ext4"))
            .await
            .map(|_| ()),
    ));
    let mut params = create_req("p", 64 * MIB, 0, "ext4");
    params.parameters.insert("usage".into(), big.clone());
    statuses.push((
        "CreateVolume parameter",
        ctl.create_volume(params).await.map(|_| ()),
    ));
    let mut params = create_req("p", 64 * MIB, 0, "ext4");
    params.parameters.insert(big.clone(), "v".into());
    statuses.push((
        "CreateVolume parameter key",
        ctl.create_volume(params).await.map(|_| ()),
    ));
    statuses.push((
        "DeleteVolume volume_id",
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: big.clone(),
            secrets: HashMap::new(),
        })
        .await
        .map(|_| ()),
    ));
    statuses.push((
        "NodeStageVolume volume_id",
        node.node_stage_volume(stage_req(&big, &d.staging_of("b"), "ext4"))
            .await
            .map(|_| ()),
    ));
    let mut publish = publish_req("id", &d.staging_of("b"), &d.target_of("p", "b"), "");
    publish.volume_context.insert("size".into(), big.clone());
    publish
        .volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    statuses.push((
        "NodePublishVolume volume_context",
        node.node_publish_volume(publish).await.map(|_| ()),
    ));
    statuses.push((
        "NodeGetVolumeStats volume_id",
        node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: big.clone(),
            volume_path: s(&d.staging_of("b")),
            staging_target_path: String::new(),
        })
        .await
        .map(|_| ()),
    ));
    statuses.push((
        "NodeUnpublishVolume target_path",
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: "id".into(),
            target_path: format!("{}/{big}", s(&d.kubelet_root())),
        })
        .await
        .map(|_| ()),
    ));
    for (what, r) in statuses {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {:?}", e.code());
        assert!(
            e.message().len() <= 400,
            "{what}: a {} byte message",
            e.message().len()
        );
        assert!(
            e.message().contains("bytes, more than the"),
            "{what}: {}",
            e.message()
        );
    }
    let log = d.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a {longest} byte log line");
    assert!(log.contains("InvalidArgument"), "{log}");
}

/// A claim below the xfs minimum is rounded up at CreateVolume (or refused
/// with OutOfRange when its limit forbids), GetCapacity says so, and inline
/// volumes follow the same rule: the volume then stages.
#[tokio::test]
async fn hostile_small_xfs_claims_are_rounded_up_to_the_filesystem_minimum() {
    let d = Daemon::start(&[]).await;
    let mut ctl = d.controller().await;
    let min_xfs = 300 * MIB;
    // "" is the default filesystem: xfs.
    for (name, fs) in [("small-xfs", "xfs"), ("small-default", "")] {
        let v = ctl
            .create_volume(create_req(name, 256 * MIB, 0, fs))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(v.capacity_bytes >= min_xfs, "{name}: {}", v.capacity_bytes);
    }
    let e = ctl
        .create_volume(create_req("capped", 256 * MIB, 256 * MIB, "xfs"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("300MiB"), "{}", e.message());
    // ext4 has a small minimum of its own.
    let v = ctl
        .create_volume(create_req("small-ext4", MIB, 0, "ext4"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        v.capacity_bytes >= 8 * MIB && v.capacity_bytes < min_xfs,
        "{}",
        v.capacity_bytes
    );
    let cap = |fs: &str| {
        let mut c = ctl.clone();
        let fs = fs.to_owned();
        async move {
            c.get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![mount_cap(&fs, &[])],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .minimum_volume_size
            .unwrap()
        }
    };
    assert!(cap("xfs").await >= min_xfs);
    assert!(cap("").await >= min_xfs);
    assert!(cap("ext4").await < min_xfs);
    // The rounded volume stages: mkfs.xfs accepts it.
    let vols = volumes(&d).await;
    let small = vols.iter().find(|v| v.name == "small-xfs").unwrap();
    let staging = d.staging_of("small-xfs");
    let mut node = d.node().await;
    node.node_stage_volume(stage_req(&small.id, &staging, "xfs"))
        .await
        .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: small.id.clone(),
        staging_target_path: s(&staging),
    })
    .await
    .unwrap();
    // Inline: a 100Mi xfs volume is rounded up and mounted.
    let target = d.target_of("inline-pod", "inline");
    let req = ephemeral_req("csi-small-inline", &target, &[("size", "100Mi")]);
    node.node_publish_volume(req).await.unwrap();
    let vols = volumes(&d).await;
    let inline = vols.iter().find(|v| v.name == "csi-small-inline").unwrap();
    assert!(inline.size_bytes >= 300 << 20, "{inline:?}");
    assert!(mounted_at(&target));
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "csi-small-inline".into(),
        target_path: s(&target),
    })
    .await
    .unwrap();
}

/// NodePublishVolume of an inline volume as the kubelet sends it.
fn ephemeral_req(id: &str, target: &Path, attrs: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut ctx: HashMap<String, String> = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "web-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        (
            "csi.storage.k8s.io/pod.uid",
            "0c8f7a4e-1111-2222-3333-444455556666",
        ),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    ctx.extend(
        attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
        volume_capability: Some(mount_cap("", &[])),
        volume_context: ctx,
        ..Default::default()
    }
}

/// The kubelet's sequence of #18.2: an inline volume's unpublish fails
/// once (device still in use) and is never retried. The daemon collects the
/// volume by itself once the device is free, without a restart, and says so
/// in the Reconcile report.
#[tokio::test]
async fn hostile_failed_inline_unpublish_is_collected_without_restart() {
    // A long period: only the after-failure collection can do it in time.
    let port = free_port();
    let d = Daemon::start(&[
        "--ephemeral-collect-interval",
        "3600",
        "--metrics-address",
        &format!("127.0.0.1:{port}"),
    ])
    .await;
    let mut node = d.node().await;
    let id = "csi-5f1c0ffee0000000000000000000000000000000000000000000000000000000";
    let target = d.target_of("0c8f7a4e", "my-csi-volume");
    // #18.4: an unknown attribute names every known key, size among them.
    let e = node
        .node_publish_volume(ephemeral_req(
            id,
            &target,
            &[("size", "64Mi"), ("colour", "red")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("colour") && e.message().contains("size"),
        "{}",
        e.message()
    );
    node.node_publish_volume(ephemeral_req(id, &target, &[("size", "64Mi")]))
        .await
        .unwrap();
    let vols = volumes(&d).await;
    let v = vols.iter().find(|v| v.name == id).expect("inline volume");
    // The container still holds the filesystem: a second mount of it.
    let hold = d.dir.path().canonicalize().unwrap().join("container-view");
    std::fs::create_dir_all(&hold).unwrap();
    let fs = mounts()
        .into_iter()
        .find(|m| m.mount_point == target)
        .unwrap()
        .fs_type;
    nix::mount::mount(
        Some(v.device.as_str()),
        hold.as_path(),
        Some(fs.as_str()),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let e = node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: s(&target),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let alive = |vols: Vec<admin::Volume>| vols.iter().any(|x| x.id == v.id && x.state == "ready");
    assert!(alive(volumes(&d).await));
    // The container goes away; the kubelet does not call again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nix::mount::umount(hold.as_path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(volumes(&d).await) {
        assert!(
            Instant::now() < deadline,
            "inline volume {} not collected; log:\n{}",
            v.id,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The pass that deleted it reports it right after.
    loop {
        let rep = reconcile_report(&d).await;
        if rep
            .node_history
            .iter()
            .any(|h| h.contains("deleted ephemeral inline volume") && h.contains(&v.id))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reported: {rep:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(port, "pmem_agent_ephemeral_volumes_collected_total").await,
        1.0
    );
    // Set when the pass that deleted it ends.
    while metric(port, "pmem_agent_ephemeral_volumes_pending_collection").await != 0.0 {
        assert!(Instant::now() < deadline, "a collection still pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Hostile callers and races against the Node service's paths, driving the
//! real binary as root: a symlink swapped under a staging path, unpublish
//! and unstage of paths the driver never published, foreign mounts, and the
//! one gRPC code each path mistake gets.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::Daemon;
use common::util::{block_cap as block, mount_cap, mounts, s};
use pmem_agent::mount::mountinfo::MountEntry;
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", &[])
}

fn mount_at(p: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == p)
}

/// Mounts of the block device `dev` (filesystems on it and binds of it).
fn mounts_of(dev: &str) -> Vec<MountEntry> {
    let name = Path::new(dev)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    mounts()
        .into_iter()
        .filter(|m| {
            m.source == dev || (m.fs_type == "devtmpfs" && m.root == Path::new("/").join(&name))
        })
        .collect()
}

fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn create(
    c: &mut ControllerClient<Channel>,
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> String {
    c.create_volume(csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: HashMap::from([("eraseAfter".to_owned(), "false".to_owned())]),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume
    .unwrap()
    .volume_id
}

async fn device(d: &Daemon, id: &str) -> String {
    d.admin()
        .await
        .get_volume(pmem_proto::admin::GetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .device
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
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        target_path: s(target),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
    }
}

/// Retries a call that may meet the swapped symlink until it succeeds.
macro_rules! until_ok {
    ($call:expr) => {{
        let mut tries = 0;
        loop {
            match $call.await {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 20000, "never succeeded: {e:?}");
                    assert!(
                        matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition),
                        "{e:?}"
                    );
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            }
        }
    }};
}

/// `K/race` swaps places with a symlink to a directory outside `K`
/// (RENAME_EXCHANGE) while NodeStageVolume and NodePublishVolume target
/// paths beneath it. Nothing is ever mounted outside `K`, and a call that
/// fails leaves nothing mounted.
#[tokio::test]
async fn hostile_symlink_race_never_mounts_outside_the_root() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let k = d.kubelet_root();
    let outside = d.dir.path().canonicalize().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let race = k.join("race");
    let alt = k.join("race.alt");
    std::fs::create_dir_all(&race).unwrap();
    std::os::unix::fs::symlink(&outside, &alt).unwrap();

    let mut vols = Vec::new();
    for i in 0..4 {
        let id = create(&mut c, &format!("race{i}"), 64 * MIB, ext4()).await;
        let dev = device(&d, &id).await;
        assert!(dev.starts_with("/dev/"), "{dev}");
        vols.push((id, dev));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (stop, swaps, race, alt) = (stop.clone(), swaps.clone(), race.clone(), alt.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &race,
                    nix::fcntl::AT_FDCWD,
                    &alt,
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
                let n = swaps.fetch_add(1, Ordering::Relaxed);
                // Uneven phases, so calls meet the directory, the symlink
                // and the moment of the swap itself.
                std::thread::sleep(Duration::from_micros(match n % 4 {
                    // K/race is the symlink.
                    0 | 2 => 300 + (n as u64 % 7) * 200,
                    // K/race is the directory again.
                    _ => 20_000 + (n as u64 % 5) * 3_000,
                }));
            }
        })
    };

    let escaped = |when: &str| {
        let bad: Vec<MountEntry> = mounts()
            .into_iter()
            .filter(|m| {
                m.mount_point.starts_with(&outside)
                    || vols.iter().any(|(_, dev)| mounts_of(dev).contains(m))
                        && !m.mount_point.starts_with(&k)
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{when}: mounts outside {}: {bad:#?}",
            k.display()
        );
    };
    let mut outcome: HashMap<String, usize> = HashMap::new();
    let mut i = 0usize;
    while swaps.load(Ordering::Relaxed) < 200 || i < 60 {
        let (id, dev) = &vols[i % vols.len()];
        let staging = race.join(format!("s{i}"));
        let target = race.join(format!("p{i}"));
        let (code, msg) = code_of(n.node_stage_volume(stage_req(id, &staging, ext4())).await);
        *outcome.entry(format!("stage {code:?}")).or_default() += 1;
        escaped("after a stage");
        if code != Code::Ok {
            assert!(
                matches!(code, Code::InvalidArgument | Code::FailedPrecondition),
                "stage: {code:?} {msg}"
            );
            assert!(
                mounts_of(dev).is_empty(),
                "a failed stage left a mount: {msg}: {:#?}",
                mounts_of(dev)
            );
            i += 1;
            continue;
        }
        assert_eq!(mounts_of(dev).len(), 1);
        let (code, msg) = code_of(
            n.node_publish_volume(publish_req(id, &staging, &target, ext4()))
                .await,
        );
        *outcome.entry(format!("publish {code:?}")).or_default() += 1;
        escaped("after a publish");
        if code == Code::Ok {
            assert_eq!(mounts_of(dev).len(), 2);
            until_ok!(n.node_unpublish_volume(unpublish_req(id, &target)));
        } else {
            assert!(
                matches!(code, Code::InvalidArgument | Code::FailedPrecondition),
                "publish: {code:?} {msg}"
            );
            assert_eq!(
                mounts_of(dev).len(),
                1,
                "a failed publish left a mount: {msg}"
            );
        }
        escaped("after an unpublish");
        until_ok!(n.node_unstage_volume(unstage_req(id, &staging)));
        assert!(mounts_of(dev).is_empty(), "unstaged but still mounted");
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    escaped("at the end");
    let total = swaps.load(Ordering::Relaxed);
    eprintln!("{i} rounds, {total} swaps: {outcome:?}");
    assert!(total >= 200);
    for (_, dev) in &vols {
        assert!(mounts_of(dev).is_empty());
    }
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "nothing was created outside the root"
    );
}

/// Unpublish and unstage remove and unmount only what the ledger records
/// as that volume's publication at exactly that path.
#[tokio::test]
async fn hostile_unpublish_and_unstage_touch_only_recorded_publications() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let k = d.kubelet_root();
    let x = create(&mut c, "x", 64 * MIB, ext4()).await;
    let conf = k.join("some/dir/important.conf");
    std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
    std::fs::write(&conf, b"keep me").unwrap();
    let empty = k.join("some/empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (id, p) in [
        (&x, &conf),
        (&x, &empty),
        (&"pmem-unknown".to_owned(), &conf),
    ] {
        n.node_unpublish_volume(unpublish_req(id, p)).await.unwrap();
        n.node_unstage_volume(unstage_req(id, p)).await.unwrap();
    }
    assert_eq!(std::fs::read(&conf).unwrap(), b"keep me");
    assert!(empty.is_dir());

    // Staged and published: unpublish at another path touches nothing;
    // unstage unmounts but leaves the CO's staging directory.
    let staging = k.join("plugins/st/x");
    let target = k.join("pods/p/x");
    n.node_stage_volume(stage_req(&x, &staging, ext4()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&x, &staging, &target, ext4()))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&x, &empty))
        .await
        .unwrap();
    assert!(empty.is_dir() && mount_at(&target).is_some());
    n.node_unstage_volume(unstage_req(&x, &k.join("plugins/st/other")))
        .await
        .unwrap();
    assert!(mount_at(&staging).is_some());
    n.node_unpublish_volume(unpublish_req(&x, &target))
        .await
        .unwrap();
    assert!(
        mount_at(&target).is_none() && !target.exists(),
        "the target it created is gone"
    );
    n.node_unstage_volume(unstage_req(&x, &staging))
        .await
        .unwrap();
    assert!(mount_at(&staging).is_none());
    assert!(staging.is_dir(), "the staging directory belongs to the CO");

    // A block target file holding data is not the empty file we made.
    let b = create(&mut c, "xb", 64 * MIB, block()).await;
    let bstage = k.join("plugins/st/xb");
    let btarget = k.join("pods/p/xb");
    n.node_stage_volume(stage_req(&b, &bstage, block()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&b, &bstage, &btarget, block()))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&b, &btarget))
        .await
        .unwrap();
    assert!(!btarget.exists());
    n.node_unstage_volume(unstage_req(&b, &bstage))
        .await
        .unwrap();
}

/// A foreign mount at a path is never unmounted: not when no publication is
/// recorded there (the sim's file-only mode, where volumes have no device),
/// and not when one is but the mount shows another device.
#[tokio::test]
async fn hostile_foreign_mounts_are_never_unmounted() {
    let tmpfs = |p: &Path| {
        std::fs::create_dir_all(p).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
    };
    {
        let d = Daemon::start(&["--sim-mode", "file-only"]).await;
        let mut c = d.controller().await;
        let mut n = d.node().await;
        let v = create(&mut c, "nodev", 64 * MIB, ext4()).await;
        let p = d.kpath("pods/q/vol");
        tmpfs(&p);
        n.node_unpublish_volume(unpublish_req(&v, &p))
            .await
            .unwrap();
        n.node_unstage_volume(unstage_req(&v, &p)).await.unwrap();
        assert_eq!(mount_at(&p).map(|m| m.fs_type), Some("tmpfs".into()));
        nix::mount::umount2(&p, nix::mount::MntFlags::empty()).unwrap();
    }
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let v = create(&mut c, "v", 64 * MIB, ext4()).await;
    let staging = d.kpath("plugins/st/v");
    let target = d.kpath("pods/p/v");
    n.node_stage_volume(stage_req(&v, &staging, ext4()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, ext4()))
        .await
        .unwrap();
    // Our bind is replaced by someone's tmpfs: refused, kept, record kept.
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    tmpfs(&target);
    let (code, msg) = code_of(n.node_unpublish_volume(unpublish_req(&v, &target)).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("another device"), "{msg}");
    assert_eq!(mount_at(&target).map(|m| m.fs_type), Some("tmpfs".into()));
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    n.node_unpublish_volume(unpublish_req(&v, &target))
        .await
        .unwrap();
    // The same under the staging path.
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    tmpfs(&staging);
    let (code, msg) = code_of(n.node_unstage_volume(unstage_req(&v, &staging)).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert_eq!(mount_at(&staging).map(|m| m.fs_type), Some("tmpfs".into()));
    nix::mount::umount2(&staging, nix::mount::MntFlags::empty()).unwrap();
    n.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
}

/// One gRPC code per path mistake (the table in ARCHITECTURE.md, "Error
/// codes"), each checked on a fresh situation.
#[tokio::test]
async fn hostile_path_error_codes() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let k = d.kubelet_root();
    let v = create(&mut c, "codes", 64 * MIB, ext4()).await;
    let vb = create(&mut c, "codes-b", 64 * MIB, block()).await;
    let dev = device(&d, &v).await;
    let staging = k.join("plugins/st/codes");
    let long = format!("{}/{}", s(&k), "d/".repeat(2100));
    std::fs::create_dir_all(k.join("real")).unwrap();
    std::os::unix::fs::symlink(k.join("real"), k.join("link")).unwrap();
    std::fs::write(k.join("a-file"), b"").unwrap();
    std::fs::create_dir_all(k.join("a-dir")).unwrap();

    enum Call {
        Stage(String, csi::VolumeCapability),
        Publish(String, String),
        PublishBlock(String),
    }
    let k_ = |r: &str| s(&k.join(r));
    let cases: Vec<(&str, Call, Code)> = vec![
        (
            "relative path",
            Call::Stage("plugins/rel".into(), ext4()),
            Code::InvalidArgument,
        ),
        (
            "longer than PATH_MAX",
            Call::Stage(long.clone(), ext4()),
            Code::InvalidArgument,
        ),
        (
            "outside the root",
            Call::Stage(s(&d.dir.path().join("elsewhere")), ext4()),
            Code::InvalidArgument,
        ),
        (
            "through a symlink",
            Call::Stage(k_("link/st"), ext4()),
            Code::InvalidArgument,
        ),
        (
            "mount_flags the kernel rejects",
            Call::Stage(
                k_("plugins/st/flags"),
                mount_cap("ext4", &["no_such_option"]),
            ),
            Code::InvalidArgument,
        ),
        (
            "a file where a directory is needed",
            Call::Stage(k_("a-file"), ext4()),
            Code::FailedPrecondition,
        ),
        (
            "target_path equal to staging_target_path",
            Call::Publish(s(&staging), s(&staging)),
            Code::InvalidArgument,
        ),
        (
            "publish target through a symlink",
            Call::Publish(s(&staging), k_("link/t")),
            Code::InvalidArgument,
        ),
        (
            "a directory where a block target file is needed",
            Call::PublishBlock(k_("a-dir")),
            Code::FailedPrecondition,
        ),
        (
            "a foreign mount at the staging path",
            Call::Stage(k_("plugins/st/tmpfs"), ext4()),
            Code::FailedPrecondition,
        ),
    ];
    let foreign = k.join("plugins/st/tmpfs");
    std::fs::create_dir_all(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    n.node_stage_volume(stage_req(&v, &staging, ext4()))
        .await
        .unwrap();
    let bstage = k.join("plugins/st/codes-b");
    n.node_stage_volume(stage_req(&vb, &bstage, block()))
        .await
        .unwrap();
    let mut failures = Vec::new();
    for (what, call, want) in cases {
        let (code, msg) = match call {
            Call::Stage(p, cap) => {
                // Unstaged first so each stage case stands alone.
                n.node_unstage_volume(unstage_req(&v, &staging))
                    .await
                    .unwrap();
                let r = code_of(
                    n.node_stage_volume(csi::NodeStageVolumeRequest {
                        volume_id: v.clone(),
                        staging_target_path: p,
                        volume_capability: Some(cap),
                        ..Default::default()
                    })
                    .await,
                );
                assert!(
                    mounts_of(&dev).is_empty(),
                    "{what}: a refused stage left a mount"
                );
                n.node_stage_volume(stage_req(&v, &staging, ext4()))
                    .await
                    .unwrap();
                r
            }
            Call::Publish(st, t) => code_of(
                n.node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: v.clone(),
                    staging_target_path: st,
                    target_path: t,
                    volume_capability: Some(ext4()),
                    ..Default::default()
                })
                .await,
            ),
            Call::PublishBlock(t) => code_of(
                n.node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: vb.clone(),
                    staging_target_path: s(&bstage),
                    target_path: t,
                    volume_capability: Some(block()),
                    ..Default::default()
                })
                .await,
            ),
        };
        assert!(msg.len() < 600, "{what}: message of {} bytes", msg.len());
        if code != want {
            failures.push(format!("{what}: want {want:?}, got {code:?} ({msg})"));
        }
    }
    nix::mount::umount2(&foreign, nix::mount::MntFlags::empty()).unwrap();

    // A device in use: the formatted volume's device is held exclusively
    // by another opener; staging it is refused, not an internal error.
    n.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
    {
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev)
            .unwrap();
        let (code, msg) = code_of(n.node_stage_volume(stage_req(&v, &staging, ext4())).await);
        if code != Code::FailedPrecondition {
            failures.push(format!(
                "a device in use: want FailedPrecondition, got {code:?} ({msg})"
            ));
        }
        assert!(mounts_of(&dev).is_empty());
    }

    // Unpublish of a target that is not empty under the mount: unmounted,
    // the record goes, the call and every retry succeed, the files stay.
    n.node_stage_volume(stage_req(&v, &staging, ext4()))
        .await
        .unwrap();
    let target = k.join("pods/full/vol");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("left-behind"), b"x").unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, ext4()))
        .await
        .unwrap();
    for _ in 0..2 {
        let (code, msg) = code_of(n.node_unpublish_volume(unpublish_req(&v, &target)).await);
        if code != Code::Ok {
            failures.push(format!(
                "unpublish of a non-empty target: want Ok, got {code:?} ({msg})"
            ));
        }
    }
    assert!(mount_at(&target).is_none());
    assert!(target.join("left-behind").exists());
    let (code, msg) = code_of(n.node_unstage_volume(unstage_req(&v, &staging)).await);
    if code != Code::Ok {
        failures.push(format!(
            "unstage after that unpublish: want Ok, got {code:?} ({msg})"
        ));
    }
    n.node_unstage_volume(unstage_req(&vb, &bstage))
        .await
        .unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
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
        ..Default::default()
    }
}

fn fs_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks() * s.fragment_size()
}

/// NodeGetVolumeStats and NodeExpandVolume resolve their paths beneath the
/// kubelet root without following symlinks and work through descriptors,
/// as stage and publish do: a path with a symlinked component (a link to
/// the real place, or an ancestor swapped for one) is InvalidArgument and
/// nothing is grown; an unknown volume is NotFound first; the plain paths
/// work, and the online xfs grow through the mount's descriptor grows it.
#[tokio::test]
async fn hostile_stats_and_expand_never_follow_symlinks() {
    let d = Daemon::start(&[]).await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let k = d.kubelet_root();
    let xfs = || mount_cap("xfs", &[]);
    let v = create(&mut c, "grow", 512 * MIB, xfs()).await;
    let staging = k.join("plugins/st/grow");
    let pod = k.join("pods/p");
    let target = pod.join("grow");
    n.node_stage_volume(stage_req(&v, &staging, xfs()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&v, &staging, &target, xfs()))
        .await
        .unwrap();
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: v.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 768 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(xfs()),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = fs_bytes(&target);

    let mut failures = Vec::new();
    let mut want = |what: &str, got: (Code, String), code: Code| {
        assert!(
            got.1.len() < 600,
            "{what}: message of {} bytes",
            got.1.len()
        );
        if got.0 != code {
            failures.push(format!(
                "{what}: want {code:?}, got {:?} ({})",
                got.0, got.1
            ));
        }
    };
    // A symlink beneath the root to the real place.
    std::os::unix::fs::symlink(&pod, k.join("alias")).unwrap();
    std::os::unix::fs::symlink(staging.parent().unwrap(), k.join("st-alias")).unwrap();
    let via = k.join("alias/grow");
    let st_via = k.join("st-alias/grow");
    want(
        "stats through a symlink",
        code_of(n.node_get_volume_stats(stats_req(&v, &via)).await),
        Code::InvalidArgument,
    );
    want(
        "expand through a symlink",
        code_of(
            n.node_expand_volume(expand_req(&v, &via, None, 768 * MIB))
                .await,
        ),
        Code::InvalidArgument,
    );
    want(
        "expand with a staging path through a symlink",
        code_of(
            n.node_expand_volume(expand_req(&v, &target, Some(&st_via), 768 * MIB))
                .await,
        ),
        Code::InvalidArgument,
    );
    want(
        "an unknown volume through a symlink",
        code_of(n.node_get_volume_stats(stats_req("pmem-nope", &via)).await),
        Code::NotFound,
    );
    want(
        "expand of an unknown volume through a symlink",
        code_of(
            n.node_expand_volume(expand_req("pmem-nope", &via, None, MIB))
                .await,
        ),
        Code::NotFound,
    );
    want(
        "stats outside the root",
        code_of(
            n.node_get_volume_stats(stats_req(&v, &d.dir.path().join("elsewhere")))
                .await,
        ),
        Code::InvalidArgument,
    );
    // The recorded path's ancestor swapped for a symlink to where it went.
    let moved = k.join("pods/p.real");
    std::fs::rename(&pod, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &pod).unwrap();
    want(
        "stats of the recorded path through a swapped ancestor",
        code_of(n.node_get_volume_stats(stats_req(&v, &target)).await),
        Code::InvalidArgument,
    );
    want(
        "expand of the recorded path through a swapped ancestor",
        code_of(
            n.node_expand_volume(expand_req(&v, &target, None, 768 * MIB))
                .await,
        ),
        Code::InvalidArgument,
    );
    assert_eq!(
        fs_bytes(&moved.join("grow")),
        before,
        "grown through a symlink"
    );
    std::fs::remove_file(&pod).unwrap();
    std::fs::rename(&moved, &pod).unwrap();

    // The plain paths work; the grow goes through the mount's descriptor.
    let st = n
        .node_get_volume_stats(stats_req(&v, &target))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage.len(), 2, "{st:?}");
    assert_eq!(u64::try_from(st.usage[0].total).unwrap(), before, "{st:?}");
    let ne = n
        .node_expand_volume(expand_req(&v, &target, Some(&staging), 768 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ne.capacity_bytes, 768 * MIB);
    let after = fs_bytes(&target);
    assert!(
        after > before + 200 * (MIB as u64),
        "xfs grew from {before} to {after}"
    );
    // Again, through the publish alone (the recorded stage is used): a no-op.
    n.node_expand_volume(expand_req(&v, &target, None, 768 * MIB))
        .await
        .unwrap();
    assert_eq!(fs_bytes(&target), after);

    // A raw block publish: the target file is judged through its fd.
    let b = create(&mut c, "grow-b", 64 * MIB, block()).await;
    let bstage = k.join("plugins/st/grow-b");
    let btarget = pod.join("grow-b");
    n.node_stage_volume(stage_req(&b, &bstage, block()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(&b, &bstage, &btarget, block()))
        .await
        .unwrap();
    want(
        "stats of a block target through a symlink",
        code_of(
            n.node_get_volume_stats(stats_req(&b, &k.join("alias/grow-b")))
                .await,
        ),
        Code::InvalidArgument,
    );
    let st = n
        .node_get_volume_stats(stats_req(&b, &btarget))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage[0].total, 64 * MIB, "{st:?}");
    assert!(!st.volume_condition.unwrap().abnormal);

    for (id, t, st) in [(&b, &btarget, &bstage), (&v, &target, &staging)] {
        n.node_unpublish_volume(unpublish_req(id, t)).await.unwrap();
        n.node_unstage_volume(unstage_req(id, st)).await.unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

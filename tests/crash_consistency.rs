//! Crash consistency of the allocator with real loop devices (root).
//!
//! In-process: a fail point panics the allocator at every step of create,
//! delete and expand; the allocator is dropped (its ledger connection and
//! lock go with it, as in a crash), reopened and reconciled. Then: the
//! extent maps match the ledger, no loop device leaked, the retried create
//! returns the same volume, the retried delete succeeds and the data of a
//! deleted volume is gone. Deletes end in `erasing`, which the daemon's
//! background eraser drains; here the test drains it (`erase_pending`) where
//! the daemon's thread would, and the fail points of the erase itself are
//! reached through it.
//!
//! Out of process: the real daemon is SIGKILLed at random moments while
//! clients create and delete, restarted, and checked the same way.

mod common;

use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pmem_allocator::sim::{MARKER, SimBackend, SimConfig, SimMode};
use pmem_allocator::{Allocator, Bytes, CreateRequest, VolumeState, loopdev};

/// Fail points are process-global: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Rig {
    dir: tempfile::TempDir,
    cfg: SimConfig,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("pmem-crash")
            .tempdir()
            .unwrap();
        let mut cfg = SimConfig::default_in(dir.path().join("sim"));
        cfg.regions = 1;
        cfg.region_size = Bytes::mib(512);
        cfg.mode = Some(SimMode::Loop);
        Rig { dir, cfg }
    }

    fn open(&self) -> Allocator {
        let backend = Arc::new(SimBackend::open(&self.cfg).expect("sim backend (needs root)"));
        let a = Allocator::open(&self.dir.path().join("ledger.db"), backend).unwrap();
        let rep = a.reconcile(false, false).unwrap();
        assert!(rep.errors.is_empty(), "reconcile errors: {:?}", rep.errors);
        a
    }

    fn region_file(&self) -> std::path::PathBuf {
        self.cfg.dir.join("region0.img")
    }

    /// Loop devices over our region file: (marker, offset, size).
    fn loops(&self) -> Vec<(String, u64, u64)> {
        loopdev::backed_by(&self.region_file())
            .unwrap()
            .into_iter()
            .map(|d| (d.name, d.offset.0, d.size_limit.0))
            .collect()
    }

    /// Every invariant that must hold after recovery, once the eraser has
    /// drained the `erasing` rows (as the daemon's eraser thread does).
    fn check(&self, a: &Allocator) {
        a.erase_pending().unwrap();
        a.check_invariants().unwrap();
        let vols = a.volumes().unwrap();
        for v in &vols {
            assert_eq!(
                v.state,
                VolumeState::Ready,
                "volume {} not driven to ready",
                v.id
            );
        }
        let mut want: Vec<(String, u64, u64)> = vols
            .iter()
            .map(|v| (format!("{MARKER}{}", v.id), v.offset.0, v.size.0))
            .collect();
        let mut have = self.loops();
        want.sort();
        have.sort();
        assert_eq!(have, want, "loop devices do not match the ledger");
        let rep = a.reconcile(true, false).unwrap();
        assert!(
            rep.is_clean() && rep.actions.is_empty(),
            "not reconciled: {rep:?}"
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        common::cleanup_dir(self.dir.path());
    }
}

fn crash<T>(point: &str, f: impl FnOnce() -> T) {
    fail::cfg(point, "panic").unwrap();
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    fail::remove(point);
    assert!(r.is_err(), "fail point {point} was not reached");
}

fn pattern(rig: &Rig, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.region_file())
        .unwrap();
    f.write_all_at(&[0xA5; 4096], offset + (8 << 20)).unwrap();
    f.sync_all().unwrap();
}

fn is_zero(rig: &Rig, offset: u64, len: u64) -> bool {
    let f = std::fs::File::open(rig.region_file()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = usize::try_from(len - pos).map_or(buf.len(), |l| l.min(buf.len()));
        f.read_exact_at(&mut buf[..n], offset + pos).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
        pos += n as u64;
    }
    true
}

const CREATE_POINTS: &[&str] = &[
    "create:after-intent",
    "create:after-begin",
    "create:after-device",
];
const DELETE_POINTS: &[&str] = &[
    "delete:after-intent",
    "delete:after-destroy",
    "delete:after-erase-intent",
    "delete:after-erase",
];
const EXPAND_POINTS: &[&str] = &["expand:after-intent", "expand:after-resize"];

#[test]
fn crash_consistency_create_at_every_step() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = fail::FailScenario::setup();
    for point in CREATE_POINTS {
        let rig = Rig::new();
        let a = rig.open();
        // A neighbour that must survive untouched.
        let keep = a
            .create_volume(&CreateRequest::new("keep", Bytes::mib(32)))
            .unwrap();
        crash(point, || {
            a.create_volume(&CreateRequest::new("vol", Bytes::mib(64)))
        });
        drop(a);

        let a = rig.open();
        rig.check(&a);
        let v = a
            .volume_by_name("vol")
            .unwrap()
            .expect("decided volume is not lost");
        let again = a
            .create_volume(&CreateRequest::new("vol", Bytes::mib(64)))
            .unwrap();
        assert_eq!(
            again.id, v.id,
            "{point}: retried create returned another volume"
        );
        assert_eq!(a.volume_by_name("keep").unwrap().unwrap().id, keep.id);
        rig.check(&a);
        a.delete_volume(&again.id).unwrap();
        a.delete_volume(&keep.id).unwrap();
        rig.check(&a);
        assert!(rig.loops().is_empty(), "{point}: loop devices leaked");
    }
    scenario.teardown();
}

#[test]
fn crash_consistency_delete_at_every_step() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = fail::FailScenario::setup();
    for point in DELETE_POINTS {
        let rig = Rig::new();
        let a = rig.open();
        let v = a
            .create_volume(&CreateRequest::new("vol", Bytes::mib(64)))
            .unwrap();
        pattern(&rig, v.offset.0);
        assert!(!is_zero(&rig, v.offset.0, v.size.0));
        // DeleteVolume, then the eraser's run (where the last points are).
        crash(point, || {
            a.delete_volume(&v.id)
                .and_then(|()| a.erase_pending().map(|_| ()))
        });
        drop(a);

        let a = rig.open();
        rig.check(&a);
        assert!(
            a.volume(&v.id).unwrap().is_none(),
            "{point}: interrupted delete not finished"
        );
        assert!(
            is_zero(&rig, v.offset.0, v.size.0),
            "{point}: data survived the delete"
        );
        a.delete_volume(&v.id).unwrap();
        // The extent is free again: the whole region fits one volume.
        let big = a
            .create_volume(&CreateRequest::new("big", Bytes::mib(512)))
            .unwrap();
        a.delete_volume(&big.id).unwrap();
        rig.check(&a);
    }
    scenario.teardown();
}

#[test]
fn crash_consistency_expand_at_every_step() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = fail::FailScenario::setup();
    for point in EXPAND_POINTS {
        let rig = Rig::new();
        let a = rig.open();
        let v = a
            .create_volume(&CreateRequest::new("vol", Bytes::mib(64)))
            .unwrap();
        crash(point, || a.expand_volume(&v.id, Bytes::mib(128), None));
        drop(a);

        let a = rig.open();
        rig.check(&a);
        let after = a.volume(&v.id).unwrap().unwrap();
        assert_eq!(
            after.size,
            Bytes::mib(128),
            "{point}: decided expansion lost"
        );
        let dev = after.device.clone().unwrap();
        assert_eq!(
            loopdev::block_size_bytes(Path::new(&dev)).unwrap(),
            Bytes::mib(128)
        );
        let again = a.expand_volume(&v.id, Bytes::mib(128), None).unwrap();
        assert_eq!(again.size, Bytes::mib(128));
        a.delete_volume(&v.id).unwrap();
        rig.check(&a);
    }
    scenario.teardown();
}

/// The real daemon, SIGKILLed while clients work, restarted each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistency_sigkill_daemon_under_load() {
    use pmem_proto::csi;
    let mut d = common::Daemon::start(&["--sim-regions", "1", "--sim-region-size", "1GiB"]).await;
    let region = d.state_dir().join("sim/region0.img");
    for round in 0u64..6 {
        let mut ctl = d.controller().await;
        let work = tokio::spawn(async move {
            for i in 0u64.. {
                let name = format!("r{round}-v{}", i % 5);
                let req = csi::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 16 << 20,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![common_block_cap()],
                    ..Default::default()
                };
                let Ok(r) = ctl.create_volume(req).await else {
                    break;
                };
                if i % 2 == 1 {
                    let id = r.into_inner().volume.unwrap().volume_id;
                    if ctl
                        .delete_volume(csi::DeleteVolumeRequest {
                            volume_id: id,
                            secrets: Default::default(),
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        // Kill at a different moment each round.
        tokio::time::sleep(std::time::Duration::from_millis(30 + round * 37)).await;
        d.kill();
        let _ = work.await;
        d.spawn().await;

        let mut admin = d.admin().await;
        // Deletes end in `erasing`; the background eraser finishes them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let erasing = admin
                .list_volumes(pmem_proto::admin::ListVolumesRequest {
                    state: "erasing".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .volumes;
            if erasing.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: erases not finished: {erasing:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let vols = admin
            .list_volumes(pmem_proto::admin::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        for v in &vols {
            assert_eq!(v.state, "ready", "round {round}: {v:?}");
        }
        let mut want: Vec<(String, u64)> = vols
            .iter()
            .map(|v| (format!("{MARKER}{}", v.id), v.offset_bytes))
            .collect();
        let mut have: Vec<(String, u64)> = loopdev::backed_by(&region)
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.offset.0))
            .collect();
        want.sort();
        have.sort();
        assert_eq!(
            have, want,
            "round {round}: loop devices do not match the ledger"
        );
        let rep = admin
            .reconcile(pmem_proto::admin::ReconcileRequest {
                dry_run: true,
                remove_orphans: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            rep.actions.is_empty() && rep.orphans.is_empty(),
            "round {round}: {rep:?}"
        );
        // The extent map is consistent: what is free is really allocatable.
        let regions = admin
            .list_regions(pmem_proto::admin::ListRegionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .regions;
        let used: u64 = vols.iter().map(|v| v.size_bytes).sum();
        assert_eq!(regions[0].available_bytes + used, regions[0].size_bytes);
    }
    d.stop();
}

fn common_block_cap() -> pmem_proto::csi::VolumeCapability {
    use pmem_proto::csi::volume_capability::{
        AccessMode, AccessType, BlockVolume, access_mode::Mode,
    };
    pmem_proto::csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

//! The LVM backend against the real `lvm` on loop devices (root), in
//! metadata-only mode (`--driverloaded n`): this host has no
//! device-mapper, so logical volumes are never activated. Command
//! construction, JSON report parsing, placement across scattered free
//! extents, growth, foreign and orphan LVs, and crash recovery at every
//! step are real; activation, mkfs and mount on LVs run in the QEMU rig
//! (`tests/rig/run lvm-e2e`).

use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use pmem_allocator::lvm::command::{LvmCommand, LvmCommandConfig, LvmRunner};
use pmem_allocator::lvm::pvs::{DevicePvs, PvRegion};
use pmem_allocator::lvm::{LvmBackend, LvmConfig, TAG};
use pmem_allocator::{
    Allocator, Backend, Bytes, CreateRequest, Error, Owner, Usage, VolumeState, loopdev,
};

const MIB: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Loop devices over sparse files, two regions (region0 on two PVs), and
/// an lvm configuration that sees only them.
struct Rig {
    /// Fail points are process-global: one rig at a time.
    _serial: std::sync::MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    loops: Vec<PathBuf>,
    prefix: String,
    lvm: Arc<LvmCommand>,
}

impl Rig {
    /// `sizes[i]` MiB per loop device; region0 gets the first two.
    fn new(sizes: &[u64]) -> Rig {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the lvm tests need root (loop devices, lvm); CI runs them as root"
        );
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("pmem-lvm")
            .tempdir()
            .unwrap();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pmemt{}x{n}-", std::process::id());
        let mut loops = Vec::new();
        for (i, s) in sizes.iter().enumerate() {
            let f = dir.path().join(format!("pv{i}.img"));
            std::fs::File::create(&f).unwrap().set_len(s * MIB).unwrap();
            let d = loopdev::attach(&f, Bytes(0), Bytes(0), &format!("{prefix}{i}")).unwrap();
            loops.push(d.path);
        }
        let accept: Vec<String> = loops
            .iter()
            .map(|l| format!("\"a|^{}$|\"", l.display()))
            .collect();
        let config = format!(
            "devices {{ obtain_device_list_from_udev = 0 use_devicesfile = 0 global_filter = [ {}, \"r|.*|\" ] }} \
             activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }} \
             global {{ use_lvmpolld = 0 }} backup {{ backup = 0 archive = 0 }}",
            accept.join(", ")
        );
        let lvm = Arc::new(LvmCommand::new(LvmCommandConfig {
            config,
            metadata_only: true,
            ..LvmCommandConfig::default()
        }));
        Rig {
            _serial: serial,
            dir,
            loops,
            prefix,
            lvm,
        }
    }

    fn source(&self) -> DevicePvs {
        let dev = |i: usize| self.loops[i].display().to_string();
        let mut regions = vec![PvRegion {
            region: "region0".into(),
            numa_node: 0,
            devices: vec![dev(0), dev(1)],
        }];
        if self.loops.len() > 2 {
            regions.push(PvRegion {
                region: "region1".into(),
                numa_node: 1,
                devices: vec![dev(2)],
            });
        }
        DevicePvs(regions)
    }

    fn backend(&self) -> Arc<LvmBackend> {
        let cfg = LvmConfig {
            vg_prefix: self.prefix.clone(),
            metadata_only: true,
        };
        Arc::new(LvmBackend::open(self.lvm.clone(), &self.source(), cfg).unwrap())
    }

    fn open(&self) -> (Allocator, Arc<LvmBackend>) {
        let b = self.backend();
        let a = Allocator::open(&self.dir.path().join("ledger.db"), b.clone()).unwrap();
        let rep = a.reconcile(false, false).unwrap();
        assert!(rep.errors.is_empty(), "reconcile errors: {:?}", rep.errors);
        (a, b)
    }

    fn vg(&self, region: &str) -> String {
        format!("{}{region}", self.prefix)
    }

    fn lvm(&self, sub: &str, args: &[&str]) -> String {
        self.lvm.run(sub, args).unwrap()
    }

    /// Our LVs: (name, size).
    fn lvs(&self) -> Vec<(String, u64)> {
        let out = self.lvm(
            "lvs",
            &[
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_name,lv_size,lv_tags,vg_name",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut got: Vec<(String, u64)> = v["report"][0]["lv"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["lv_tags"].as_str().unwrap_or("").contains(TAG))
            .map(|l| {
                (
                    l["lv_name"].as_str().unwrap().to_owned(),
                    l["lv_size"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        got.sort();
        got
    }

    /// Every invariant that must hold after recovery, once the eraser has
    /// drained the `erasing` rows (as the daemon's eraser thread does).
    fn check(&self, a: &Allocator) {
        a.erase_pending().unwrap();
        a.check_invariants().unwrap();
        let vols = a.volumes().unwrap();
        for v in &vols {
            assert_eq!(v.state, VolumeState::Ready, "volume {} not ready", v.id);
        }
        let mut want: Vec<(String, u64)> = vols.iter().map(|v| (v.id.clone(), v.size.0)).collect();
        want.sort();
        assert_eq!(self.lvs(), want, "logical volumes do not match the ledger");
        let rep = a.reconcile(true, false).unwrap();
        assert!(
            rep.is_clean() && rep.actions.is_empty(),
            "not reconciled: {rep:?}"
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for r in ["region0", "region1"] {
            let _ = self
                .lvm
                .run("vgremove", &["--force", "--force", &self.vg(r)]);
        }
        for l in &self.loops {
            let _ = self.lvm.run(
                "pvremove",
                &["--force", "--force", &l.display().to_string()],
            );
            let _ = loopdev::detach(l);
        }
    }
}

fn create(a: &Allocator, name: &str, mib: u64) -> pmem_allocator::Result<pmem_allocator::Volume> {
    a.create_volume(&CreateRequest {
        region: Some("region0".into()),
        ..CreateRequest::new(name, Bytes(mib * MIB))
    })
}

#[test]
fn lvm_volume_groups_pvs_and_capacity() {
    let rig = Rig::new(&[64, 64, 128]);
    let (a, b) = rig.open();
    let out = rig.lvm(
        "pvs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pv_name,vg_name,pe_start",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for pv in v["report"][0]["pv"].as_array().unwrap() {
        let start: u64 = pv["pe_start"].as_str().unwrap().parse().unwrap();
        assert_eq!(start % (2 * MIB), 0, "pe_start {start} not 2 MiB aligned");
    }
    let caps = a.capacity(Usage::AppDirect).unwrap();
    // Each 64 MiB PV: 2 MiB metadata area, then 15 extents of 4 MiB.
    assert_eq!(caps[0].spec.size, Bytes(30 * 4 * MIB));
    assert_eq!(caps[0].spec.align, Bytes(4 * MIB));
    assert_eq!(caps[0].largest, caps[0].available);
    assert_eq!(caps[0].minimum, Bytes(4 * MIB));
    assert_eq!(caps[1].spec.numa_node, 1);
    assert!(b.describe().contains("metadata-only"));
    // A volume as large as the group's largest spans both PVs.
    let big = create(&a, "big", caps[0].largest.0 / MIB).unwrap();
    assert_eq!(big.size, caps[0].largest);
    assert_eq!(big.offset, Bytes::ZERO);
    assert!(matches!(
        create(&a, "more", 4),
        Err(Error::Exhausted { .. })
    ));
    rig.check(&a);
    a.delete_volume(&big.id).unwrap();
    a.erase_pending().unwrap();
    // Small volumes round up to one extent.
    let small = create(&a, "small", 1).unwrap();
    assert_eq!(small.size, Bytes(4 * MIB));
    a.delete_volume(&small.id).unwrap();
    rig.check(&a);
}

#[test]
fn lvm_fragmentation_does_not_matter() {
    let rig = Rig::new(&[64, 64]);
    let (a, b) = rig.open();
    let unit = a.capacity(Usage::AppDirect).unwrap()[0].available.0 / 4 / (4 * MIB) * 4;
    // A, B, C, D fill the group (D takes the rest); delete A and C.
    let ids: Vec<String> = ["A", "B", "C"]
        .iter()
        .map(|n| create(&a, n, unit).unwrap().id)
        .collect();
    let rest = a.capacity(Usage::AppDirect).unwrap()[0].largest.0 / MIB;
    let d = create(&a, "D", rest).unwrap();
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        Bytes::ZERO
    );
    a.delete_volume(&ids[0]).unwrap();
    a.delete_volume(&ids[2]).unwrap();
    a.erase_pending().unwrap();
    let caps = a.capacity(Usage::AppDirect).unwrap();
    assert_eq!(
        caps[0].largest,
        Bytes(2 * unit * MIB),
        "GetCapacity says A+C fits"
    );
    let before = b.invocations();
    let ac = create(&a, "AC", 2 * unit).unwrap();
    let per_create = b.invocations() - before;
    assert_eq!(ac.size, Bytes(2 * unit * MIB));
    rig.check(&a);
    // Online growth takes free extents anywhere.
    a.delete_volume(&ids[1]).unwrap();
    a.erase_pending().unwrap();
    let before = b.invocations();
    let grown = a
        .expand_volume(&d.id, Bytes((rest + unit) * MIB), None)
        .unwrap();
    let per_expand = b.invocations() - before;
    assert_eq!(grown.size, Bytes((rest + unit) * MIB));
    rig.check(&a);
    let before = b.invocations();
    a.delete_volume(&ac.id).unwrap();
    a.erase_pending().unwrap();
    let per_delete = b.invocations() - before;
    a.delete_volume(&d.id).unwrap();
    rig.check(&a);
    println!(
        "lvm invocations: create {per_create}, expand {per_expand}, delete (with erase) {per_delete}"
    );
    // One report per change: a create is lvcreate plus at most one report.
    assert!(per_create <= 3, "create ran {per_create} lvm commands");
}

#[test]
fn lvm_foreign_and_orphan_logical_volumes() {
    let rig = Rig::new(&[64, 64]);
    let vg = rig.vg("region0");
    let (a, _) = rig.open();
    let v = create(&a, "v", 8).unwrap();
    drop(a);
    // Someone else's LV in our group, and one of ours the ledger forgot.
    rig.lvm(
        "lvcreate",
        &[
            "--activate",
            "n",
            "--zero",
            "n",
            "--size",
            "8m",
            "--name",
            "theirs",
            &vg,
        ],
    );
    rig.lvm(
        "lvcreate",
        &[
            "--activate",
            "n",
            "--zero",
            "n",
            "--size",
            "12m",
            "--name",
            "pmem-orphan",
            "--addtag",
            TAG,
            &vg,
        ],
    );
    let (a, _) = rig.open();
    let rep = a.reconcile(true, false).unwrap();
    assert_eq!(rep.foreign.len(), 1, "{rep:?}");
    assert_eq!(rep.orphans.len(), 1, "{rep:?}");
    assert_eq!(rep.orphans[0].owner, Owner::Ours("pmem-orphan".into()));
    let total = a.capacity(Usage::AppDirect).unwrap()[0].spec.size;
    // Their space is not offered.
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        total - Bytes(8 * MIB) - Bytes(8 * MIB) - Bytes(12 * MIB)
    );
    let rep = a.reconcile(false, true).unwrap();
    assert!(
        rep.actions.iter().any(|s| s.contains("removed orphan")),
        "{rep:?}"
    );
    // The orphan's space is back at once, the foreign LV is still there.
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        total - Bytes(16 * MIB)
    );
    let out = rig.lvm("lvs", &["--noheadings", "-o", "lv_name", &vg]);
    assert!(
        out.contains("theirs") && !out.contains("pmem-orphan"),
        "{out}"
    );
    a.check_invariants().unwrap();
    a.delete_volume(&v.id).unwrap();
    // A missing LV of a ready volume is reported, not recreated empty.
    let w = create(&a, "w", 8).unwrap();
    rig.lvm("lvremove", &["--yes", &format!("{vg}/{}", w.id)]);
    let rep = a.reconcile(false, false).unwrap();
    assert_eq!(rep.missing, vec![w.id.clone()], "{rep:?}");
}

#[test]
fn lvm_refuses_a_volume_group_that_is_not_ours() {
    let rig = Rig::new(&[64, 64]);
    let dev = rig.loops[0].display().to_string();
    rig.lvm("pvcreate", &[&dev]);
    rig.lvm("vgcreate", &[&rig.vg("region0"), &dev]);
    let cfg = LvmConfig {
        vg_prefix: rig.prefix.clone(),
        metadata_only: true,
    };
    let e = LvmBackend::open(rig.lvm.clone(), &rig.source(), cfg).unwrap_err();
    assert!(e.to_string().contains("is not ours"), "{e}");
}

/// The bytes of an LV's first extent on its PV (metadata-only: no LV device).
fn lv_head(rig: &Rig, name: &str) -> (PathBuf, u64) {
    let out = rig.lvm(
        "lvs",
        &[
            "--reportformat",
            "json",
            "-o",
            "lv_name,seg_pe_ranges",
            &rig.vg("region0"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let lv = v["report"][0]["lv"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lv_name"] == name)
        .unwrap()
        .clone();
    let range = lv["seg_pe_ranges"].as_str().unwrap();
    let (dev, span) = range
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    let first: u64 = span.split_once('-').unwrap().0.parse().unwrap();
    (PathBuf::from(dev), 2 * MIB + first * 4 * MIB)
}

fn read_at(dev: &Path, at: u64) -> Vec<u8> {
    let f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn lvm_delete_renames_the_lv_and_the_eraser_zeroes_it_all() {
    let rig = Rig::new(&[64, 64]);
    let (a, _) = rig.open();
    let vg = rig.vg("region0");
    // Dirty the whole first PV, as a tenant would have.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.loops[0])
        .unwrap();
    let junk = vec![0xA5u8; MIB as usize];
    for i in 2..64 {
        f.write_all_at(&junk, i * MIB).unwrap();
    }
    f.sync_all().unwrap();
    let v = create(&a, "v", 8).unwrap();
    let (dev, at) = lv_head(&rig, &v.id);
    // At create only the head is wiped (no stale filesystem signature);
    // the rest is zeroed at delete, not now.
    assert!(
        read_at(&dev, at).iter().all(|&b| b == 0),
        "head not wiped at create"
    );
    assert!(
        read_at(&dev, at + MIB).iter().all(|&b| b == 0xA5),
        "zeroed beyond the head at create"
    );
    a.delete_volume(&v.id).unwrap();
    // DeleteVolume returned: the LV holds its extents under the erasing
    // name (lvcreate cannot take them), nothing is zeroed yet, and the
    // extents are not free.
    let erasing = format!("erasing-{}", v.id);
    assert_eq!(rig.lvs(), [(erasing.clone(), 8 * MIB)]);
    assert_eq!(lv_head(&rig, &erasing), (dev.clone(), at));
    assert!(read_at(&dev, at + 5 * MIB).iter().all(|&b| b == 0xA5));
    assert_eq!(
        a.volume(&v.id).unwrap().unwrap().state,
        VolumeState::Erasing
    );
    let caps = a.capacity(Usage::AppDirect).unwrap();
    assert_eq!(caps[0].available, caps[0].spec.size - Bytes(8 * MIB));
    let rep = a.reconcile(true, false).unwrap();
    assert!(rep.is_clean() && rep.orphans.is_empty(), "{rep:?}");
    assert_eq!(a.erase_pending().unwrap(), 1);
    for off in [0, 5 * MIB, 8 * MIB - 4096] {
        assert!(
            read_at(&dev, at + off).iter().all(|&b| b == 0),
            "not erased at {off}"
        );
    }
    // Only the LV's extents: the next extent on the PV is untouched.
    assert!(read_at(&dev, at + 8 * MIB).iter().all(|&b| b == 0xA5));
    assert!(rig.lvs().is_empty());
    let out = rig.lvm("lvs", &["--noheadings", "-o", "lv_name", &vg]);
    assert!(out.trim().is_empty(), "{out}");
    a.check_invariants().unwrap();
}

fn crash<T>(point: &str, f: impl FnOnce() -> T) {
    fail::cfg(point, "panic").unwrap();
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    fail::remove(point);
    assert!(r.is_err(), "fail point {point} was not reached");
}

#[test]
fn lvm_crash_at_every_step() {
    let scenario = fail::FailScenario::setup();
    let rig = Rig::new(&[64, 64]);
    for point in [
        "create:after-intent",
        "create:after-begin",
        "create:after-device",
    ] {
        let (a, _) = rig.open();
        crash(point, || create(&a, "vol", 8));
        drop(a);
        let (a, _) = rig.open();
        rig.check(&a);
        let v = a
            .volume_by_name("vol")
            .unwrap()
            .expect("decided volume is lost");
        assert_eq!(create(&a, "vol", 8).unwrap().id, v.id, "{point}");
        a.delete_volume(&v.id).unwrap();
        rig.check(&a);
    }
    for point in [
        "delete:after-intent",
        "delete:after-destroy",
        "delete:after-erase-intent",
        "delete:after-erase",
    ] {
        let (a, _) = rig.open();
        let v = create(&a, "vol", 8).unwrap();
        // DeleteVolume, then the eraser's run (where the last points are).
        crash(point, || {
            a.delete_volume(&v.id)
                .and_then(|()| a.erase_pending().map(|_| ()))
        });
        drop(a);
        let (a, _) = rig.open();
        rig.check(&a);
        assert!(
            a.volume(&v.id).unwrap().is_none(),
            "{point}: delete not finished"
        );
        a.delete_volume(&v.id).unwrap();
    }
    for point in ["expand:after-intent", "expand:after-resize"] {
        let (a, _) = rig.open();
        let v = create(&a, "vol", 8).unwrap();
        crash(point, || a.expand_volume(&v.id, Bytes(20 * MIB), None));
        drop(a);
        let (a, _) = rig.open();
        rig.check(&a);
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().size,
            Bytes(20 * MIB),
            "{point}"
        );
        a.delete_volume(&v.id).unwrap();
        rig.check(&a);
    }
    assert!(rig.lvs().is_empty(), "logical volumes leaked");
    scenario.teardown();
}

//! The direct backend against the in-memory libnvdimm model, alone and
//! under the allocator: sysfs sequences, undo, placement agreement,
//! capacity exactness, foreign and label-less regions, crash states.

use std::sync::Arc;
use std::time::Duration;

use super::model::Model;
use super::*;
use crate::allocator::{Allocator, CreateRequest};

const M: u64 = 1 << 20;
const G: u64 = 1 << 30;
const DEV: &str = "bus/nd/devices/";

/// Without the identity namespace: these tests pin exact sysfs sequences
/// and offsets; `identity_*` below run with it.
fn cfg() -> DirectConfig {
    DirectConfig {
        device_timeout: Duration::from_millis(200),
        placement_timeout: Duration::from_secs(3),
        identity: false,
        ..DirectConfig::default()
    }
}

fn model(regions: &[u64]) -> Arc<Model> {
    let m = Arc::new(Model::new());
    for &r in regions {
        m.labeled_region(r);
    }
    m
}

fn backend(m: &Arc<Model>) -> Arc<DirectBackend> {
    Arc::new(DirectBackend::with(m.clone(), m.clone(), cfg()).unwrap())
}

/// An allocator on a single-tenant node: the `eraseAfter=false` volumes of
/// these tests are destroyed at once (the erase path has its own tests).
fn alloc(dir: &tempfile::TempDir, b: &Arc<DirectBackend>) -> Allocator {
    let a = Allocator::open(&dir.path().join("ledger.db"), b.clone()).unwrap();
    a.set_erase_policy(crate::ErasePolicy {
        allow_unerased_reuse: true,
        rate: None,
    });
    a.reconcile(false, false).unwrap();
    a
}

fn create(a: &Allocator, name: &str, size: u64, usage: Usage) -> Result<crate::Volume> {
    a.create_volume(&CreateRequest {
        usage,
        erase_after: false,
        ..CreateRequest::new(name, Bytes(size))
    })
}

fn req(id: &str, region: &str, offset: u64, size: u64) -> DeviceRequest {
    DeviceRequest {
        volume_id: id.into(),
        region: region.into(),
        offset: Bytes(offset),
        size: Bytes(size),
        usage: Usage::AppDirect,
    }
}

fn vid(n: u8) -> String {
    format!("pmem-{:032x}", n)
}

/// Writes from `from` on, as (attribute path without the prefix, value).
fn writes_since(m: &Model, from: usize) -> Vec<(String, String)> {
    m.writes()[from..]
        .iter()
        .map(|(p, v)| (p.trim_start_matches(DEV).to_owned(), v.clone()))
        .collect()
}

#[test]
fn discovers_regions() {
    let m = model(&[2 * G, 2 * G]);
    m.set_numa(1, 1);
    let b = backend(&m);
    let specs = b.regions().unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[0].id, "region0");
    assert_eq!(specs[0].size, Bytes(2 * G));
    // Lowered at open from the kernel's 16 MiB.
    assert_eq!(specs[0].align, Bytes(2 * M));
    assert_eq!(m.read(&format!("{DEV}region0/align")).unwrap(), "0x200000");
    assert_eq!(specs[0].ns_slots, 1019);
    assert_eq!(specs[1].numa_node, 1);
    assert!(
        specs[0].location.contains("region0 (nmem0)"),
        "{}",
        specs[0].location
    );
    assert!(
        b.describe().contains("region0 (2GiB, labeled"),
        "{}",
        b.describe()
    );
    assert_eq!(b.placement(), Placement::FirstFit);
}

#[test]
fn refuses_read_only_sysfs_and_missing_bus() {
    let m = model(&[G]);
    m.set_read_only(true);
    let e = DirectBackend::with(m.clone(), m.clone(), cfg()).unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("read-only") && s.contains("rw")),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let e = DirectBackend::open(DirectConfig {
        sysfs_root: dir.path().into(),
        ..cfg()
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("no libnvdimm bus") && s.contains("modprobe")),
        "{e}"
    );
}

#[test]
fn fsdax_create_and_delete_write_what_ndctl_writes() {
    let m = model(&[2 * G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let w0 = m.writes().len();
    let v = create(&a, "v", G, Usage::AppDirect).unwrap();
    // 1 GiB usable needs a 1 GiB + 18 MiB namespace (memmap on the device).
    assert_eq!(v.size, Bytes(G + 18 * M));
    assert_eq!(a.usable_of(&v), Bytes(G));
    assert_eq!(v.device.as_deref(), Some("/dev/pmem0"));
    let u = namespace_uuid(&v.id);
    let w = writes_since(&m, w0);
    let names: Vec<&str> = w.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        [
            "namespace0.0/uuid",
            "namespace0.0/alt_name",
            "namespace0.0/sector_size",
            "namespace0.0/size",
            "namespace0.0/holder_class",
            "pfn0.0/uuid",
            "pfn0.0/mode",
            "pfn0.0/align",
            "pfn0.0/namespace",
            "bus/nd/drivers/nd_pmem/bind",
        ]
    );
    assert_eq!(w[0].1, u);
    assert_eq!(w[1].1, format!("pmem-agent:{}", v.id));
    assert_eq!(w[3].1, (G + 18 * M).to_string());
    assert_eq!(w[6].1, "pmem");
    assert_eq!(w[7].1, "2097152");
    assert_eq!(w[9].1, "pfn0.0");
    // Nothing is zeroed at create: extents are erased at delete.
    assert!(m.zeroed().is_empty(), "{:?}", m.zeroed());
    let ns = m.namespaces();
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].4, "memory");
    assert_eq!(
        m.read(&format!("{DEV}region0/namespace_seed")).unwrap(),
        "namespace0.1"
    );

    let w0 = m.writes().len();
    a.delete_volume(&v.id).unwrap();
    let w = writes_since(&m, w0);
    let expect = [
        ("pfn0.0/driver/unbind", "pfn0.0"),
        ("pfn0.0/namespace", ""),
        ("namespace0.0/holder_class", ""),
        ("namespace0.0/force_raw", "1"),
        ("bus/nd/drivers/nd_pmem/bind", "namespace0.0"),
        ("namespace0.0/force_raw", "0"),
        ("namespace0.0/driver/unbind", "namespace0.0"),
        ("namespace0.0/size", "0"),
    ];
    let got: Vec<(&str, &str)> = w.iter().map(|(p, v)| (p.as_str(), v.as_str())).collect();
    assert_eq!(got, expect);
    assert_eq!(m.zeroed()[0], ("pmem0".to_owned(), 0, 8192, false));
    assert!(m.namespaces().is_empty());
    assert!(!m.info_block_at(0, 0));
    assert_eq!(
        m.read(&format!("{DEV}region0/available_size")).unwrap(),
        (2 * G).to_string()
    );
    a.check_invariants().unwrap();
}

#[test]
fn fileio_is_sector_mode() {
    let m = model(&[2 * G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = create(&a, "s", 100 * M, Usage::FileIo).unwrap();
    assert_eq!(v.device.as_deref(), Some("/dev/pmem0s"));
    assert_eq!(m.namespaces()[0].4, "safe");
    let usable = a.usable_of(&v);
    assert!(usable >= Bytes(100 * M));
    assert_eq!(usable, Bytes(layout::sector_usable(v.size.0)));
    assert!(
        m.writes()
            .iter()
            .any(|(p, v)| p.ends_with("btt0.0/sector_size") && v == "4096")
    );
    a.delete_volume(&v.id).unwrap();
    assert!(m.namespaces().is_empty());
}

#[test]
fn capacity_is_exact() {
    for usage in [Usage::AppDirect, Usage::FileIo] {
        let m = model(&[2 * G]);
        let b = backend(&m);
        let dir = tempfile::tempdir().unwrap();
        let a = alloc(&dir, &b);
        let max = a.capacity(usage).unwrap()[0].largest;
        assert_eq!(max, Bytes(layout::usable(2 * G, usage)));
        for too_big in [max.0 + 1, max.0 + 2 * M, max.0 + 16 * M] {
            let e = create(&a, "big", too_big, usage).unwrap_err();
            assert!(matches!(e, Error::Exhausted { .. }), "{usage}: {e}");
        }
        let v = create(&a, "max", max.0, usage).unwrap();
        // The smallest extent holding the maximum; what it leaves (if
        // anything) holds no volume.
        assert_eq!(v.size, Bytes(layout::extent_for(max.0, usage, 2 * M)));
        assert!(2 * G - v.size.0 <= 2 * M, "{}", v.size);
        assert_eq!(a.usable_of(&v), max);
        assert_eq!(a.capacity(usage).unwrap()[0].largest, Bytes(0));
        a.delete_volume(&v.id).unwrap();
        // After a 16 MiB foreign namespace at the start the maximum shrinks.
        m.ndctl_create(0, 16 * M, "foreign", None).unwrap();
        drop(a);
        let a = alloc(&dir, &backend(&m));
        let max = a.capacity(usage).unwrap()[0].largest;
        assert_eq!(max, Bytes(layout::usable(2 * G - 16 * M, usage)));
        let v = create(&a, "max", max.0, usage).unwrap();
        assert_eq!(v.offset, Bytes(16 * M));
        assert!(create(&a, "more", 1, usage).is_err());
    }
}

/// Bytes zeroed and verified on `dev`, summed.
fn verified(m: &Model, dev: &str) -> u64 {
    m.zeroed()
        .iter()
        .filter(|z| z.0 == dev && z.3)
        .map(|z| z.2)
        .sum()
}

#[test]
fn delete_retires_the_namespace_and_the_eraser_zeroes_then_destroys_it() {
    let m = model(&[G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = a
        .create_volume(&CreateRequest::new("e", Bytes(200 * M)))
        .unwrap();
    assert!(v.erase_after);
    // No zeroing at create.
    assert!(m.zeroed().is_empty(), "{:?}", m.zeroed());
    a.delete_volume(&v.id).unwrap();
    // Back from DeleteVolume: the fsdax device is gone, the namespace is
    // kept raw under the erasing marker with its info block wiped, and the
    // extent is neither free nor a volume's device.
    let ns = m.namespaces();
    assert_eq!(ns.len(), 1, "{ns:?}");
    assert_eq!(ns[0].3, format!("pmem-agent-erasing:{}", v.id));
    assert_eq!(ns[0].4, "raw");
    assert!(!m.info_block_at(0, 0));
    assert_eq!(
        verified(&m, "pmem0"),
        0,
        "zeroed before DeleteVolume returned"
    );
    let vol = a.volume(&v.id).unwrap().unwrap();
    assert_eq!(vol.state, crate::VolumeState::Erasing);
    assert!(
        b.find(&crate::allocator::device_request(&vol))
            .unwrap()
            .is_none()
    );
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        Bytes(G - v.size.0)
    );
    let rep = a.reconcile(true, false).unwrap();
    assert!(rep.is_clean() && rep.actions.is_empty(), "{rep:?}");
    assert_eq!(a.erase_pending().unwrap(), 1);
    assert_eq!(verified(&m, "pmem0"), v.size.0, "{:?}", m.zeroed());
    assert!(m.namespaces().is_empty());
    assert_eq!(a.capacity(Usage::AppDirect).unwrap()[0].available, Bytes(G));
    a.check_invariants().unwrap();
}

#[test]
fn an_erase_resumes_after_a_reboot_and_the_namespace_is_never_an_orphan() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let v = {
        let a = alloc(&dir, &backend(&m));
        let v = a
            .create_volume(&CreateRequest::new("e", Bytes(64 * M)))
            .unwrap();
        a.delete_volume(&v.id).unwrap();
        v
    };
    // The labels keep the erasing marker; with the info block gone no
    // fsdax claim comes back.
    m.reboot();
    let b = backend(&m);
    let a = alloc(&dir, &b);
    let rep = a.reconcile(false, false).unwrap();
    assert!(rep.is_clean() && rep.orphans.is_empty(), "{rep:?}");
    let ns = m.namespaces();
    assert_eq!(ns.len(), 1, "{ns:?}");
    assert_eq!(ns[0].3, format!("pmem-agent-erasing:{}", v.id));
    assert_ne!(ns[0].4, "memory");
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        Bytes(G - v.size.0)
    );
    assert_eq!(a.erase_pending().unwrap(), 1);
    assert!(m.namespaces().is_empty());
    assert!(a.volume(&v.id).unwrap().is_none());
    a.check_invariants().unwrap();
}

#[test]
fn an_erasing_namespace_without_a_ledger_row_is_an_orphan_erased_before_removal() {
    let m = model(&[G]);
    let v = {
        let dir = tempfile::tempdir().unwrap();
        let a = alloc(&dir, &backend(&m));
        let v = a
            .create_volume(&CreateRequest::new("e", Bytes(64 * M)))
            .unwrap();
        a.delete_volume(&v.id).unwrap();
        v
    };
    // Another ledger (lost): the namespace is ours, reserved, not free.
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        Bytes(G - v.size.0)
    );
    let rep = a.reconcile(true, false).unwrap();
    assert_eq!(rep.orphans.len(), 1, "{rep:?}");
    assert_eq!(rep.orphans[0].owner, Owner::Ours(v.id.clone()));
    a.reconcile(false, true).unwrap();
    assert!(m.namespaces().is_empty());
    assert_eq!(verified(&m, "pmem0"), v.size.0, "{:?}", m.zeroed());
    assert_eq!(a.capacity(Usage::AppDirect).unwrap()[0].available, Bytes(G));
}

#[test]
fn a_busy_device_refuses_the_retire_and_the_volume_stays_ready() {
    let m = model(&[G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = a
        .create_volume(&CreateRequest::new("e", Bytes(64 * M)))
        .unwrap();
    m.set_busy("pmem0", true);
    for _ in 0..3 {
        let e = a.delete_volume(&v.id).unwrap_err();
        assert!(matches!(&e, Error::FailedPrecondition(_)), "{e}");
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().state,
            crate::VolumeState::Ready
        );
        assert_eq!(m.namespaces()[0].4, "memory");
    }
    m.set_busy("pmem0", false);
    a.delete_volume(&v.id).unwrap();
    assert_eq!(a.erase_pending().unwrap(), 1);
    assert!(m.namespaces().is_empty());
}

#[test]
fn busy_devices_are_not_deleted() {
    let m = model(&[G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = create(&a, "b", 64 * M, Usage::AppDirect).unwrap();
    m.set_busy("pmem0", true);
    let e = a.delete_volume(&v.id).unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("/dev/pmem0") && s.contains("in use")),
        "{e}"
    );
    assert_eq!(m.namespaces()[0].4, "memory");
    assert_eq!(
        a.volume(&v.id).unwrap().unwrap().state,
        crate::VolumeState::Ready
    );
    m.set_busy("pmem0", false);
    a.delete_volume(&v.id).unwrap();
}

#[test]
fn label_less_regions_are_reported_and_refused() {
    let m = Arc::new(Model::new());
    m.labelless_region(G);
    m.labeled_region(G);
    let b = backend(&m);
    let specs = b.regions().unwrap();
    assert_eq!(specs[0].ns_slots, 0);
    assert!(b.describe().contains("label-less"), "{}", b.describe());
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let caps = a.capacity(Usage::AppDirect).unwrap();
    assert_eq!((caps[0].available, caps[0].largest), (Bytes(0), Bytes(0)));
    let e = a
        .create_volume(&CreateRequest {
            region: Some("region0".into()),
            ..CreateRequest::new("x", Bytes(16 * M))
        })
        .unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("label-less") && s.contains("ndctl init-labels all")),
        "{e}"
    );
    // The labeled region still serves; the raw namespace is foreign, untouched.
    let v = create(&a, "y", 16 * M, Usage::AppDirect).unwrap();
    assert_eq!(v.region, "region1");
    let rep = a.reconcile(false, true).unwrap();
    assert_eq!(rep.foreign.len(), 1);
    assert!(matches!(&rep.foreign[0].owner, Owner::Foreign(s) if s.contains("label-less")));
    assert_eq!(m.read(&format!("{DEV}namespace0.0/mode")).unwrap(), "raw");
    // The backend itself refuses too.
    let e = b.create(&req(&vid(9), "region0", 0, 16 * M)).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
}

#[test]
fn foreign_namespaces_are_reserved_and_never_touched() {
    let m = model(&[G]);
    let foreign = m
        .ndctl_create(0, 64 * M, "database", Some(ClaimKind::Pfn))
        .unwrap();
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let caps = a.capacity(Usage::AppDirect).unwrap();
    assert_eq!(caps[0].available, Bytes(G - 64 * M));
    let v = create(&a, "v", 16 * M, Usage::AppDirect).unwrap();
    assert_eq!(v.offset, Bytes(64 * M));
    let rep = a.reconcile(false, true).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.foreign.len(), 1);
    assert_eq!(rep.foreign[0].path, foreign);
    a.delete_volume(&v.id).unwrap();
    let left = m.namespaces();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].3.as_str(), left[0].4.as_str()),
        ("database", "memory")
    );
    // A foreign namespace is never removed as an orphan.
    let item = &rep.foreign[0];
    assert!(b.remove_orphan(item).is_err());
}

#[test]
fn a_namespace_made_behind_our_back_fails_the_create_cleanly() {
    let m = model(&[G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    m.ndctl_create(0, 32 * M, "sneaky", None).unwrap();
    let before = m.snapshot();
    let e = create(&a, "v", 16 * M, Usage::AppDirect).unwrap_err();
    assert!(
        matches!(&e, Error::Device(s) if s.contains("not free in the kernel") && s.contains("sneaky")),
        "{e}"
    );
    assert_eq!(m.snapshot(), before);
    assert!(a.volumes().unwrap().is_empty());
    a.check_invariants().unwrap();
}

#[test]
fn failed_steps_are_undone_exactly() {
    let m = model(&[G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let before = m.snapshot();
    for (path, errno) in [
        ("namespace0.0/size", libc::EINVAL),
        ("namespace0.0/holder_class", libc::EBUSY),
        ("pfn0.0/mode", libc::EINVAL),
        ("pfn0.0/namespace", libc::EBUSY),
        ("drivers/nd_pmem/bind", libc::ENXIO),
    ] {
        m.fail_next_write(path, errno);
        let e = create(&a, "v", 16 * M, Usage::AppDirect).unwrap_err();
        assert!(matches!(e, Error::Device(_)), "{path}: {e}");
        assert!(!e.to_string().contains("undo incomplete"), "{path}: {e}");
        assert_eq!(m.snapshot(), before, "after a failed write to {path}");
        assert!(a.volumes().unwrap().is_empty());
    }
    m.fail_next_write("namespace0.0/size", libc::EINVAL);
    let e = create(&a, "v", 16 * M, Usage::AppDirect).unwrap_err();
    assert!(e.to_string().contains("region alignment"), "{e}");
    a.check_invariants().unwrap();
    // And the next create works.
    create(&a, "v", 16 * M, Usage::AppDirect).unwrap();
}

#[test]
fn concurrent_creates_wait_for_earlier_extents() {
    let m = model(&[G]);
    let b = backend(&m);
    let (ra, rb) = (
        req(&vid(1), "region0", 0, 16 * M),
        req(&vid(2), "region0", 16 * M, 16 * M),
    );
    // B first: the kernel would put it at 0, so it waits for A.
    let later = {
        let b = b.clone();
        let rb = rb.clone();
        std::thread::spawn(move || {
            b.begin_create(&rb).unwrap();
            b.create(&rb)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    b.begin_create(&ra).unwrap();
    b.create(&ra).unwrap();
    later.join().unwrap().unwrap();
    let ns = m.namespaces();
    assert_eq!((ns[0].1, ns[1].1), (0, 16 * M));
    assert_eq!(ns[1].3, format!("pmem-agent:{}", vid(2)));
    // Alone, B gives up after the placement timeout without writing.
    let m = model(&[G]);
    let b = Arc::new(
        DirectBackend::with(
            m.clone(),
            m.clone(),
            DirectConfig {
                placement_timeout: Duration::from_millis(50),
                ..cfg()
            },
        )
        .unwrap(),
    );
    // Only the region alignment was written, at open.
    let w0 = m.writes().len();
    b.begin_create(&rb).unwrap();
    let e = b.create(&rb).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    assert_eq!(m.writes().len(), w0);
    // With A under way (wipe_head called) but stuck, B waits and gives up.
    b.begin_create(&ra).unwrap();
    b.begin_create(&rb).unwrap();
    let e = b.create(&rb).unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    assert_eq!(m.writes().len(), w0);
}

#[test]
fn a_missing_namespace_in_the_way_fails_fast() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&m);
    let a = alloc(&dir, &b);
    let v = create(&a, "v", 16 * M, Usage::AppDirect).unwrap();
    let ns = m.namespaces()[0].0.clone();
    m.write(&format!("{DEV}pfn0.0/driver/unbind"), "pfn0.0")
        .unwrap();
    m.write(&format!("{DEV}pfn0.0/namespace"), "").unwrap();
    m.write(&format!("{DEV}{ns}/size"), "0").unwrap();
    let t0 = std::time::Instant::now();
    let e = create(&a, "w", 16 * M, Usage::AppDirect).unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("ledger holds that space")),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Deleting the broken volume clears the way.
    a.delete_volume(&v.id).unwrap();
    create(&a, "w", 16 * M, Usage::AppDirect).unwrap();
}

#[test]
fn regions_proceed_in_parallel() {
    let m = model(&[G, G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(alloc(&dir, &b));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || create(&a, &format!("v{i}"), 16 * M, Usage::AppDirect))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(m.namespaces().len(), 8);
    let rep = a.reconcile(false, false).unwrap();
    assert!(rep.is_clean() && rep.actions.is_empty(), "{rep:?}");
    a.check_invariants().unwrap();
}

/// What our create had written before a crash after the `size` write.
fn half_made(m: &Model, id: &str, size: u64) -> String {
    let seed = m.read(&format!("{DEV}region0/namespace_seed")).unwrap();
    m.write(&format!("{DEV}{seed}/uuid"), &namespace_uuid(id))
        .unwrap();
    m.write(
        &format!("{DEV}{seed}/alt_name"),
        &format!("pmem-agent:{id}"),
    )
    .unwrap();
    m.write(&format!("{DEV}{seed}/size"), &size.to_string())
        .unwrap();
    seed
}

#[test]
fn interrupted_creates_are_completed() {
    // Crash after `size`: the namespace is still the seed.
    let m = model(&[G]);
    let seed = half_made(&m, &vid(1), 16 * M);
    let b = backend(&m);
    let r = req(&vid(1), "region0", 0, 16 * M);
    assert_eq!(b.find(&r).unwrap(), None);
    b.begin_create(&r).unwrap();
    let d = b.create(&r).unwrap();
    assert_eq!(d.path.as_deref(), Some("/dev/pmem0"));
    assert_eq!(m.namespaces()[0].0, seed);
    assert_eq!(m.namespaces()[0].4, "memory");
    assert!(m.zeroed().is_empty(), "zeroed at create: {:?}", m.zeroed());

    // Crash after `size`, then a reboot: the kernel binds it raw.
    let m = model(&[G]);
    half_made(&m, &vid(1), 16 * M);
    m.reboot();
    assert_eq!(m.namespaces()[0].4, "raw");
    let b = backend(&m);
    b.begin_create(&r).unwrap();
    b.create(&r).unwrap();
    assert_eq!(m.namespaces()[0].4, "memory");

    // The same raw namespace for a ready volume is not re-initialised.
    let m = model(&[G]);
    half_made(&m, &vid(1), 16 * M);
    m.reboot();
    let b = backend(&m);
    let e = b.create(&r).unwrap_err();
    assert!(e.to_string().contains("refusing to re-initialise"), "{e}");
    assert_eq!(m.namespaces()[0].4, "raw");

    // Crash after the bind: a repeated create finds the complete device.
    let m = model(&[G]);
    let b = backend(&m);
    b.begin_create(&r).unwrap();
    b.create(&r).unwrap();
    b.begin_create(&r).unwrap();
    b.create(&r).unwrap();
    assert_eq!(m.namespaces().len(), 1);
    assert!(m.zeroed().is_empty(), "zeroed at create: {:?}", m.zeroed());
}

#[test]
fn a_vanished_namespace_of_a_ready_volume_is_not_made_again() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&m);
    let a = alloc(&dir, &b);
    let v = create(&a, "v", 16 * M, Usage::AppDirect).unwrap();
    // ndctl destroy-namespace behind our back.
    let ns = m.namespaces()[0].0.clone();
    m.write(&format!("{DEV}pfn0.0/driver/unbind"), "pfn0.0")
        .unwrap();
    m.write(&format!("{DEV}pfn0.0/namespace"), "").unwrap();
    m.write(&format!("{DEV}{ns}/size"), "0").unwrap();
    let before = m.snapshot();
    let rep = a.reconcile(false, false).unwrap();
    assert_eq!(rep.missing, std::slice::from_ref(&v.id), "{rep:?}");
    assert!(rep.errors[0].contains("is gone"), "{rep:?}");
    assert_eq!(m.snapshot(), before);
}

#[test]
fn a_disabled_namespace_is_enabled_again() {
    let m = model(&[G]);
    let b = backend(&m);
    let r = req(&vid(1), "region0", 0, 16 * M);
    b.begin_create(&r).unwrap();
    b.create(&r).unwrap();
    // ndctl disable-namespace: only the pfn is unbound.
    m.write(&format!("{DEV}pfn0.0/driver/unbind"), "pfn0.0")
        .unwrap();
    assert_eq!(b.find(&r).unwrap(), None);
    let z = m.zeroed().len();
    let d = b.create(&r).unwrap();
    assert_eq!(d.path.as_deref(), Some("/dev/pmem0"));
    assert_eq!(m.zeroed().len(), z, "a ready volume's data is not touched");
}

#[test]
fn volumes_survive_a_reboot_and_reconcile_clean() {
    let m = model(&[G, G]);
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = {
        let a = alloc(&dir, &backend(&m));
        let v1 = create(&a, "a", 100 * M, Usage::AppDirect).unwrap();
        let v2 = create(&a, "b", 100 * M, Usage::FileIo).unwrap();
        let v3 = create(&a, "c", 16 * M, Usage::AppDirect).unwrap();
        a.delete_volume(&v1.id).unwrap();
        vec![v2.id, v3.id]
    };
    m.reboot();
    let b = backend(&m);
    let a = alloc(&dir, &b);
    let rep = a.reconcile(false, false).unwrap();
    assert!(rep.is_clean() && rep.actions.is_empty(), "{rep:?}");
    for id in &ids {
        let v = a.volume(id).unwrap().unwrap();
        let d = b
            .find(&crate::allocator::device_request(&v))
            .unwrap()
            .unwrap();
        assert_eq!(d.path, v.device);
    }
    a.check_invariants().unwrap();
}

#[test]
fn orphans_are_reported_reserved_and_removed_on_request() {
    let m = model(&[G]);
    let orphan_id = vid(7);
    m.ndctl_create(
        0,
        32 * M,
        &format!("pmem-agent:{orphan_id}"),
        Some(ClaimKind::Pfn),
    )
    .unwrap();
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].available,
        Bytes(G - 32 * M)
    );
    let rep = a.reconcile(true, false).unwrap();
    assert_eq!(rep.orphans.len(), 1);
    assert_eq!(rep.orphans[0].owner, Owner::Ours(orphan_id));
    let rep = a.reconcile(false, true).unwrap();
    assert!(
        rep.actions.iter().any(|s| s.contains("removed orphan")),
        "{rep:?}"
    );
    assert!(m.namespaces().is_empty());
    // The orphan's space is offered again without a restart.
    assert_eq!(a.capacity(Usage::AppDirect).unwrap()[0].available, Bytes(G));
    a.check_invariants().unwrap();
}

#[test]
fn expansion_is_refused_before_anything_is_recorded() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    let v = create(&a, "v", 16 * M, Usage::AppDirect).unwrap();
    let e = a.expand_volume(&v.id, Bytes(64 * M), None).unwrap_err();
    assert!(
        matches!(&e, Error::FailedPrecondition(s) if s.contains("cannot grow")),
        "{e}"
    );
    assert_eq!(a.volume(&v.id).unwrap().unwrap().size, v.size);
}

#[test]
fn a_mismatched_namespace_is_an_error_not_a_guess() {
    let m = model(&[G]);
    let b = backend(&m);
    let r = req(&vid(1), "region0", 0, 16 * M);
    b.begin_create(&r).unwrap();
    b.create(&r).unwrap();
    let moved = req(&vid(1), "region0", 32 * M, 16 * M);
    let e = b.find(&moved).unwrap_err();
    assert!(e.to_string().contains("but the ledger has"), "{e}");
    // destroy still removes it: the marker says it is ours.
    b.destroy(&moved).unwrap();
    assert!(m.namespaces().is_empty());
    assert!(marker_with(MARKER, &"x".repeat(60)).is_err());
}

#[test]
fn fragmentation_limits_the_largest_volume() {
    // A, B, C, D fill the region; after A and C go, the largest volume is
    // one hole, not A+C (the lvm backend's pooled regions differ here).
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    let quarter = a.capacity(Usage::AppDirect).unwrap()[0].largest.0 / 4 / M * M;
    let ids: Vec<String> = ["A", "B", "C"]
        .iter()
        .map(|n| create(&a, n, quarter, Usage::AppDirect).unwrap().id)
        .collect();
    let rest = a.capacity(Usage::AppDirect).unwrap()[0].largest;
    create(&a, "D", rest.0, Usage::AppDirect).unwrap();
    a.delete_volume(&ids[0]).unwrap();
    a.delete_volume(&ids[2]).unwrap();
    let cap = &a.capacity(Usage::AppDirect).unwrap()[0];
    assert!(
        cap.largest.0 >= quarter && cap.largest.0 < 2 * quarter,
        "{cap:?}"
    );
    assert!(cap.available.0 >= 2 * quarter);
    let e = create(&a, "AC", 2 * quarter, Usage::AppDirect).unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e}");
    create(&a, "fits", cap.largest.0, Usage::AppDirect).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn creates_wait_for_udevd_to_process_the_device() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    m.set_udev_lag(5);
    create(&a, "v", 64 * M, Usage::AppDirect).unwrap();
    assert_eq!(m.udev_lag(), 0, "the create did not wait for udevd");
    // A udevd that never answers delays a create by the deadline, no more.
    m.set_udev_lag(u32::MAX);
    let t = std::time::Instant::now();
    create(&a, "w", 64 * M, Usage::AppDirect).unwrap();
    assert!(t.elapsed() >= cfg().device_timeout);
}

/// The backend as the daemon runs it: with the identity namespace.
fn identity_backend(m: &Arc<Model>) -> Arc<DirectBackend> {
    Arc::new(
        DirectBackend::with(
            m.clone(),
            m.clone(),
            DirectConfig {
                identity: true,
                ..cfg()
            },
        )
        .unwrap(),
    )
}

fn identity_ns(m: &Model, region_offset_zero: bool) -> Vec<(String, u64, u64, String, String)> {
    m.namespaces()
        .into_iter()
        .filter(|n| n.3.starts_with(IDENTITY_PREFIX) && (!region_offset_zero || n.1 == 0))
        .collect()
}

#[test]
fn identity_first_open_stamps_and_capacity_stays_exact() {
    let m = model(&[2 * G]);
    let b = identity_backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let id = a.ledger_id().unwrap();
    let ns = identity_ns(&m, true);
    assert_eq!(ns.len(), 1, "{:?}", m.namespaces());
    assert_eq!(ns[0].3, format!("{IDENTITY_PREFIX}{id}"));
    let align = a.capacity(Usage::AppDirect).unwrap()[0].spec.align.0;
    assert_eq!(ns[0].2, align, "one alignment unit");
    // Capacity excludes it exactly: the largest volume offered is created,
    // and then nothing more fits.
    let cap = &a.capacity(Usage::AppDirect).unwrap()[0];
    assert_eq!(cap.available, Bytes(2 * G - align));
    let v = create(&a, "all", cap.largest.0, Usage::AppDirect).unwrap();
    assert_eq!(v.offset, Bytes(align));
    let e = create(&a, "more", M, Usage::AppDirect).unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e}");
    // Not a foreign device, not an orphan; the new namespace's marker
    // carries the ledger's short id.
    let rep = a.reconcile(true, false).unwrap();
    assert!(rep.foreign.is_empty() && rep.orphans.is_empty(), "{rep:?}");
    let marker = m
        .namespaces()
        .into_iter()
        .find(|n| n.3.ends_with(&v.id))
        .unwrap()
        .3;
    assert_eq!(marker, format!("{MARKER}{}:{}", &id[..8], v.id));
    drop(a);
    // The next open finds the stamp and creates nothing.
    let writes = m.writes().len();
    let a = alloc(&dir, &b);
    assert!(a.refusal().is_none() && a.lost_regions().is_empty());
    assert_eq!(identity_ns(&m, false).len(), 1);
    assert!(
        writes_since(&m, writes).is_empty(),
        "{:?}",
        writes_since(&m, writes)
    );
}

#[test]
fn identity_lost_ledger_over_our_namespaces_is_refused_then_rebuilt() {
    let m = model(&[2 * G]);
    let b = identity_backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = create(&a, "sector", 64 * M, Usage::FileIo).unwrap();
    let w = create(&a, "dax", 64 * M, Usage::AppDirect).unwrap();
    drop(a);
    for f in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let a = Allocator::open(&dir.path().join("ledger.db"), b.clone()).unwrap();
    let why = a.refusal().expect("refused");
    assert!(why.contains("pmemctl ledger rebuild"), "{why}");
    let e = create(&a, "x", 16 * M, Usage::AppDirect).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    assert!(a.reconcile(false, false).is_err());
    let dry = a.rebuild_ledger(false).unwrap();
    assert!(!dry.applied && a.refusal().is_some());
    let mut got: Vec<(String, Usage, Bytes, Bytes)> = dry
        .volumes
        .iter()
        .map(|x| (x.id.clone(), x.usage, x.offset, x.size))
        .collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    let mut want = vec![
        (v.id.clone(), Usage::FileIo, v.offset, v.size),
        (w.id.clone(), Usage::AppDirect, w.offset, w.size),
    ];
    want.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(got, want);
    let rep = a.rebuild_ledger(true).unwrap();
    assert!(rep.applied && a.refusal().is_none());
    assert!(rep.backup.is_some());
    let clean = a.reconcile(false, false).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert!(a.volume(&v.id).unwrap().unwrap().device.is_some());
    a.check_invariants().unwrap();
    // The same extents are taken; new volumes go elsewhere.
    let x = create(&a, "x", 16 * M, Usage::AppDirect).unwrap();
    assert!(x.offset >= w.offset + w.size || x.offset + x.size <= v.offset);
}

#[test]
fn identity_namespace_removed_makes_the_region_lost_until_reinit() {
    let m = model(&[2 * G, 2 * G]);
    let b = identity_backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let v = create(&a, "v", 64 * M, Usage::AppDirect).unwrap();
    assert_eq!(v.region, "region0");
    drop(a);
    // An operator destroys region0's identity namespace with ndctl.
    let ns = identity_ns(&m, true)
        .into_iter()
        .find(|n| n.0.starts_with("namespace0."))
        .unwrap()
        .0;
    m.write(&format!("{DEV}{ns}/driver/unbind"), &ns).unwrap();
    m.write(&format!("{DEV}{ns}/force_raw"), "0").unwrap();
    m.write(&format!("{DEV}{ns}/size"), "0").unwrap();
    let a = alloc(&dir, &b);
    assert!(a.refusal().is_none());
    assert!(a.lost_regions()["region0"].contains("stamp is gone"));
    let caps = a.capacity(Usage::AppDirect).unwrap();
    assert_eq!((caps[0].available, caps[0].largest), (Bytes(0), Bytes(0)));
    assert!(caps[0].lost.is_some());
    assert_eq!(
        create(&a, "w", 64 * M, Usage::AppDirect).unwrap().region,
        "region1"
    );
    let e = a.delete_volume(&v.id).unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    let zeroed = m.zeroed().len();
    let rec = a.reinit_region("region0").unwrap();
    assert_eq!(rec.volumes.len(), 1);
    assert!(a.lost_regions().is_empty());
    // v's namespace was zeroed whole before its space was freed.
    assert!(
        m.zeroed()[zeroed..].iter().any(|z| z.2 == v.size.0 && z.3),
        "{:?}",
        m.zeroed()
    );
    assert!(a.volume(&v.id).unwrap().is_none());
    assert_eq!(identity_ns(&m, false).len(), 2);
    let big = a.capacity(Usage::AppDirect).unwrap()[0].largest;
    assert_eq!(
        create(&a, "big", big.0, Usage::AppDirect).unwrap().region,
        "region0"
    );
    a.check_invariants().unwrap();
}

fn exact(a: &Allocator, name: &str, size: u64, usage: Usage) -> Result<crate::Volume> {
    a.create_volume(&CreateRequest {
        usage,
        erase_after: false,
        limit: Some(Bytes(size)),
        ..CreateRequest::new(name, Bytes(size))
    })
}

/// The issue's request: required == limit of a round size is served on
/// fsdax with exactly that capacity, and the device has exactly it.
#[test]
fn round_fsdax_sizes_are_served_exactly() {
    let m = model(&[8 * G]);
    let b = backend(&m);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let mut end = 0;
    for (i, size) in [512 * M, G, 2 * G, 4 * G].into_iter().enumerate() {
        let v = exact(&a, &format!("r{i}"), size, Usage::AppDirect).unwrap();
        assert_eq!(a.usable_of(&v), Bytes(size));
        let d = b
            .find(&crate::allocator::device_request(&v))
            .unwrap()
            .unwrap();
        assert_eq!(d.size, Bytes(size), "the block device is exactly {size}");
        // Packed back to back in 2 MiB units, no 16 MiB rounding gaps.
        assert_eq!(v.offset, Bytes(end));
        end += v.size.0;
    }
    assert_eq!(end, (522 + 1042 + 2082 + 4162) * M);
    a.check_invariants().unwrap();
}

/// Sector mode has no round sizes: the refusal names the two nearest,
/// and both are then served exactly.
#[test]
fn sector_round_sizes_answer_the_two_nearest() {
    let m = model(&[2 * G]);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    let e = exact(&a, "s", 512 * M, Usage::FileIo).unwrap_err();
    let (below, above) = (
        layout::sector_usable(512 * M),
        layout::sector_usable(514 * M),
    );
    match &e {
        Error::OutOfRange(msg) => {
            assert!(
                msg.contains(&format!("({below} bytes) and"))
                    && msg.contains(&format!("({above} bytes)")),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(a.volumes().unwrap().is_empty(), "nothing recorded");
    for (n, size) in [("below", below), ("above", above)] {
        let v = exact(&a, n, size, Usage::FileIo).unwrap();
        assert_eq!(a.usable_of(&v), Bytes(size));
    }
}

/// GetCapacity's numbers under the 2 MiB layout: the maximum is created
/// (also as required == limit), one byte or one step more is not, and the
/// minimum is the smallest volume (4 MiB namespace, 2 MiB usable).
#[test]
fn capacity_maximum_and_minimum_are_exact_in_2mib_units() {
    let m = model(&[G]);
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &backend(&m));
    // Fragment: holes of odd 2 MiB sizes.
    let x = exact(&a, "x", 100 * M, Usage::AppDirect).unwrap();
    let y = exact(&a, "y", 30 * M, Usage::AppDirect).unwrap();
    exact(&a, "z", 6 * M, Usage::AppDirect).unwrap();
    a.delete_volume(&x.id).unwrap();
    a.delete_volume(&y.id).unwrap();
    for usage in [Usage::AppDirect, Usage::FileIo] {
        let cap = &a.capacity(usage).unwrap()[0];
        let min = cap.minimum;
        assert_eq!(
            min,
            Bytes(layout::usable(layout::extent_for(1, usage, 2 * M), usage))
        );
        let max = cap.largest;
        for more in [max.0 + 1, max.0 + 2 * M] {
            let e = create(&a, "more", more, usage).unwrap_err();
            assert!(matches!(e, Error::Exhausted { .. }), "{usage}: {e}");
        }
        let v = exact(&a, "max", max.0, usage).unwrap();
        assert_eq!(a.usable_of(&v), max);
        a.delete_volume(&v.id).unwrap();
        // The minimum as limit_bytes (required 0) is served, exactly.
        let v = a
            .create_volume(&CreateRequest {
                usage,
                erase_after: false,
                limit: Some(min),
                ..CreateRequest::new("min", Bytes(0))
            })
            .unwrap();
        assert_eq!(a.usable_of(&v), min);
        a.delete_volume(&v.id).unwrap();
    }
    assert_eq!(
        a.capacity(Usage::AppDirect).unwrap()[0].minimum,
        Bytes(2 * M)
    );
    a.check_invariants().unwrap();
}

/// A kernel that refuses the alignment (no attribute, or EINVAL): the
/// backend starts at the region's 16 MiB, and a round request gets the
/// two nearest sizes of that layout.
#[test]
fn a_refused_alignment_keeps_16mib_and_names_the_nearest_sizes() {
    let m = model(&[2 * G]);
    m.fail_next_write("region0/align", libc::EINVAL);
    let b = backend(&m);
    assert_eq!(b.regions().unwrap()[0].align, Bytes(16 * M));
    let dir = tempfile::tempdir().unwrap();
    let a = alloc(&dir, &b);
    let e = exact(&a, "r", 512 * M, Usage::AppDirect).unwrap_err();
    assert!(
        matches!(&e, Error::OutOfRange(s) if s.contains("rounds up to 518MiB (alignment 16MiB)") && s.contains("502MiB (526385152 bytes) and 518MiB (543162368 bytes)")),
        "{e}"
    );
    let v = exact(&a, "r", 518 * M, Usage::AppDirect).unwrap();
    assert_eq!(a.usable_of(&v), Bytes(518 * M));
}

/// The alignment is not persistent: after a reboot (16 MiB again) the
/// next open writes it again, the volumes come back where they were,
/// and round sizes are still served. A ledger made at 16 MiB (before this
/// layout) takes the lower alignment with its volumes in place.
#[test]
fn the_alignment_is_applied_again_after_a_reboot() {
    let m = model(&[4 * G]);
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let b = Arc::new(
            DirectBackend::with(
                m.clone(),
                m.clone(),
                DirectConfig {
                    namespace_align: None,
                    ..cfg()
                },
            )
            .unwrap(),
        );
        let a = alloc(&dir, &b);
        assert_eq!(b.regions().unwrap()[0].align, Bytes(16 * M));
        create(&a, "old", 100 * M, Usage::AppDirect).unwrap()
    };
    let v = {
        let a = alloc(&dir, &backend(&m));
        assert_eq!(
            a.capacity(Usage::AppDirect).unwrap()[0].spec.align,
            Bytes(2 * M)
        );
        assert_eq!(a.volume(&old.id).unwrap().unwrap().offset, Bytes(0));
        exact(&a, "round", 512 * M, Usage::AppDirect).unwrap()
    };
    m.reboot();
    assert_eq!(m.read(&format!("{DEV}region0/align")).unwrap(), "0x1000000");
    let b = backend(&m);
    assert_eq!(m.read(&format!("{DEV}region0/align")).unwrap(), "0x200000");
    let a = alloc(&dir, &b);
    let rep = a.reconcile(false, false).unwrap();
    assert!(rep.is_clean() && rep.actions.is_empty(), "{rep:?}");
    let back = a.volume(&v.id).unwrap().unwrap();
    let d = b
        .find(&crate::allocator::device_request(&back))
        .unwrap()
        .unwrap();
    assert_eq!(d.size, Bytes(512 * M));
    let w = exact(&a, "after", G, Usage::AppDirect).unwrap();
    assert_eq!(a.usable_of(&w), Bytes(G));
    // Placed in 2 MiB units right after the 522 MiB one.
    assert_eq!(w.offset, Bytes(back.offset.0 + 522 * M));
    a.check_invariants().unwrap();
}

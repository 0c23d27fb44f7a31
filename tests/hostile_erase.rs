//! Hostile tests of erasing (issue 11, items 4 and 6), on the real daemon with
//! real loop devices (root): no volume ever exposes bytes a previous volume
//! wrote; DeleteVolume does not wait for the zeroing, whose extent stays out
//! of capacity until it is done, also across a kill -9; a delete the device
//! refuses (held open, exclusively or not) leaves the volume ready.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Daemon;
use common::util::{
    block_create_req, capacity, free_port, get_volume, loop_name, metric, open_excl, read_at,
    wait_until, write_at,
};
use pmem_proto::admin;
use pmem_proto::csi;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// Where the tenant's marker goes.
const MARKER_AT: u64 = 32 * MIB;

async fn create(d: &Daemon, name: &str, size: u64, erase_after: bool) -> admin::Volume {
    let v = d
        .controller()
        .await
        .create_volume(block_create_req(name, size, erase_after))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
        .into_inner()
        .volume
        .unwrap();
    get_volume(d, &v.volume_id)
        .await
        .expect("created volume in the ledger")
}

async fn delete(d: &Daemon, id: &str) -> Result<(), tonic::Status> {
    d.controller()
        .await
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            secrets: HashMap::new(),
        })
        .await
        .map(|_| ())
}

/// Waits until the eraser removed the row.
async fn wait_gone(d: &Daemon, id: &str) {
    wait_until(d, &format!("volume {id} erased"), 120, async || {
        get_volume(d, id).await.is_none()
    })
    .await;
}

async fn available(d: &Daemon) -> u64 {
    u64::try_from(capacity(d).await.available_capacity).unwrap()
}

/// tenantA writes a marker at 32 MiB and is deleted; tenantB, created on
/// the same extent, must read zeros there, whatever eraseAfter said, unless
/// the node is declared single-tenant and the volume asked for no erase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_erase_no_volume_sees_a_previous_volumes_bytes() {
    assert!(common::is_root(), "needs root (loop devices)");
    for (erase_after, single_tenant) in [(true, false), (false, false), (false, true)] {
        let mut extra = vec!["--sim-regions", "1"];
        if single_tenant {
            extra.push("--allow-unerased-reuse");
        }
        let d = Daemon::start(&extra).await;
        let case = format!("eraseAfter={erase_after} single-tenant={single_tenant}");
        let a = create(&d, "tenantA", 64 * MIB, erase_after).await;
        write_at(&a.device, MARKER_AT, &[0xA5; 4096]);
        delete(&d, &a.id).await.unwrap();
        wait_gone(&d, &a.id).await;
        let b = create(&d, "tenantB", 64 * MIB, true).await;
        assert_eq!(
            (b.region.as_str(), b.offset_bytes),
            (a.region.as_str(), a.offset_bytes),
            "{case}: tenantB is not on tenantA's extent"
        );
        let got = read_at(&b.device, MARKER_AT, 4096);
        if single_tenant {
            assert!(
                got.iter().all(|&x| x == 0xA5),
                "{case}: a declared single-tenant node skips the erase of eraseAfter=false"
            );
        } else {
            assert!(
                got.iter().all(|&x| x == 0),
                "{case}: tenantB reads tenantA's bytes"
            );
        }
        // Nothing is zeroed at create either: tenantB's own bytes stay.
        write_at(&b.device, 0, &[0x5A; 4096]);
        delete(&d, &b.id).await.unwrap();
        wait_gone(&d, &b.id).await;
    }
}

/// A large volume's delete returns with its extent `erasing`; capacity and
/// placement exclude it, the metric shows it pending; kill -9 during the
/// erase, restart: the erase resumes and only then is the extent reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_erase_runs_in_the_background_and_resumes_after_kill_9() {
    assert!(common::is_root(), "needs root (loop devices)");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // A slow eraser (16 MiB/s: half a minute for 512 MiB) keeps the erase
    // observable; the restart runs at full speed.
    let base = ["--sim-regions", "1", "--metrics-address", &addr];
    let mut d = Daemon::start(&[&base[..], &["--erase-rate", "16MiB"]].concat()).await;
    let total = available(&d).await;
    let big = create(&d, "big", 512 * MIB, true).await;
    for at in [0, MARKER_AT, 256 * MIB, 511 * MIB] {
        write_at(&big.device, at, &[0xA5; 4096]);
    }
    delete(&d, &big.id).await.unwrap();
    let now = get_volume(&d, &big.id)
        .await
        .expect("row kept while erasing");
    assert_eq!(now.state, "erasing", "DeleteVolume waited for the erase");
    assert_eq!(now.device, big.device);
    assert_ne!(
        loop_name(&big.device),
        format!("pmem-agent:{}", big.id),
        "the tenant's loop device is still attached"
    );
    assert_eq!(available(&d).await, total - 512 * MIB);
    assert!(metric(port, "pmem_agent_erase_pending_bytes").await > 0.0);
    // The erasing extent is never handed out: the rest of the region is.
    let other = create(&d, "other", 512 * MIB, true).await;
    assert_ne!(other.offset_bytes, big.offset_bytes);
    let full = d
        .controller()
        .await
        .create_volume(block_create_req("nope", 16 * MIB, true))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full}");
    delete(&d, &other.id).await.unwrap();

    // A crash in the middle of the erase.
    assert_eq!(get_volume(&d, &big.id).await.unwrap().state, "erasing");
    d.kill();
    d.extra = base.iter().map(|s| s.to_string()).collect();
    d.spawn().await;
    wait_gone(&d, &big.id).await;
    wait_gone(&d, &other.id).await;
    assert_eq!(available(&d).await, total);
    assert!(metric(port, "pmem_agent_erased_bytes_total").await >= (512 * MIB) as f64);
    assert_eq!(metric(port, "pmem_agent_erase_pending_bytes").await, 0.0);
    let c = create(&d, "tenantC", 512 * MIB, true).await;
    assert_eq!(c.offset_bytes, big.offset_bytes);
    for at in [0, MARKER_AT, 256 * MIB, 511 * MIB] {
        assert!(
            read_at(&c.device, at, 4096).iter().all(|&x| x == 0),
            "tenantC reads big's bytes at {at}"
        );
    }
    delete(&d, &c.id).await.unwrap();
    d.stop();
}

/// Held open exclusively (as a mount does) or plainly by some process, the
/// device refuses the delete, and the volume stays ready and usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_erase_a_refused_delete_leaves_the_volume_ready() {
    assert!(common::is_root(), "needs root (loop devices)");
    let d = Daemon::start(&["--sim-regions", "1"]).await;
    let v = create(&d, "held", 64 * MIB, true).await;
    for exclusive in [true, false] {
        let mut held = if exclusive {
            open_excl(&v.device).unwrap()
        } else {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&v.device)
                .unwrap()
        };
        for i in 0..5 {
            let e = delete(&d, &v.id).await.unwrap_err();
            assert_eq!(
                e.code(),
                Code::FailedPrecondition,
                "exclusive={exclusive} try {i}: {e}"
            );
            assert!(e.message().contains("in use"), "{e}");
            let now = get_volume(&d, &v.id).await.unwrap();
            assert_eq!(now.state, "ready", "exclusive={exclusive} try {i}");
            assert_eq!(now.device, v.device);
        }
        // Still the tenant's device, still attached after the holder goes.
        if !exclusive {
            held.write_all(&[0x11; 512]).unwrap();
            held.sync_all().unwrap();
        }
        drop(held);
        assert_eq!(loop_name(&v.device), format!("pmem-agent:{}", v.id));
        let mut f = std::fs::File::open(&v.device).unwrap();
        let mut b = [0u8; 512];
        f.read_exact(&mut b).unwrap();
        assert_eq!(b[0], if exclusive { 0 } else { 0x11 });
    }
    delete(&d, &v.id).await.unwrap();
    wait_gone(&d, &v.id).await;
}

/// A holder that grabs the device exclusively on and off, racing the delete
/// between its idle check and the removal: every refused delete leaves the
/// volume ready (never `deleting`), and each delete finally succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_erase_a_delete_racing_an_exclusive_holder_never_sticks_in_deleting() {
    assert!(common::is_root(), "needs root (loop devices)");
    let d = Daemon::start(&["--sim-regions", "1"]).await;
    let region = d.state_dir().join("sim/region0.img");
    let region = region.canonicalize().unwrap();
    let (mut refused, mut rounds) = (0u32, 0u32);
    for n in 0..20 {
        let v = create(&d, &format!("race{n}"), 16 * MIB, true).await;
        let stop = Arc::new(AtomicBool::new(false));
        let holder = {
            let (stop, dev, region) = (stop.clone(), v.device.clone(), region.clone());
            let name = format!("pmem-agent:{}", v.id);
            std::thread::spawn(move || {
                let sys = format!(
                    "/sys/block/{}/loop/backing_file",
                    dev.trim_start_matches("/dev/")
                );
                while !stop.load(Ordering::Relaxed) {
                    // Only while it is still this volume's device: loop
                    // numbers are reused by other tests once it is gone.
                    let ours = std::fs::read_to_string(&sys)
                        .is_ok_and(|b| std::path::Path::new(b.trim()) == region)
                        && loop_name(&dev) == name;
                    if !ours {
                        break;
                    }
                    if let Ok(f) = open_excl(&dev) {
                        std::thread::sleep(Duration::from_millis(3));
                        drop(f);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            rounds += 1;
            match delete(&d, &v.id).await {
                Ok(()) => break,
                Err(e) => {
                    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
                    refused += 1;
                    let now = get_volume(&d, &v.id)
                        .await
                        .expect("refused delete removed the row");
                    assert_eq!(now.state, "ready", "refused delete left {now:?}");
                }
            }
            assert!(Instant::now() < deadline, "delete never got through");
        }
        stop.store(true, Ordering::Relaxed);
        holder.join().unwrap();
        wait_gone(&d, &v.id).await;
    }
    eprintln!("{refused} of {rounds} deletes refused by the racing holder");
    assert!(refused > 0, "the holder never raced a delete");
}

fn list_page(r: &csi::ListVolumesResponse) -> Vec<String> {
    r.entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect()
}

/// A deleted volume whose extent is still being erased is gone for the CO:
/// ControllerGetVolume, ValidateVolumeCapabilities and ControllerExpandVolume
/// answer NotFound, ListVolumes skips it (also when a page boundary falls
/// on it), its extent stays out of GetCapacity; the operator's
/// `pmemctl volumes` shows it `erasing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_erase_an_erasing_volume_is_gone_for_the_co() {
    assert!(common::is_root(), "needs root (loop devices)");
    // 4 MiB/s: the 512 MiB erase outlasts the test by far.
    let d = Daemon::start(&["--sim-regions", "1", "--erase-rate", "4MiB"]).await;
    let total = available(&d).await;
    let a = create(&d, "a", 64 * MIB, true).await;
    let big = create(&d, "big", 512 * MIB, true).await;
    let c = create(&d, "c", 64 * MIB, true).await;
    let mut ctl = d.controller().await;
    let list = |max: i32, token: String| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token,
    };
    // A page boundary that falls on "big" while it still exists.
    let p1 = ctl
        .list_volumes(list(1, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list_page(&p1), vec![a.id.clone()]);
    assert!(!p1.next_token.is_empty());

    delete(&d, &big.id).await.unwrap();
    assert_eq!(get_volume(&d, &big.id).await.unwrap().state, "erasing");

    let e = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: big.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: big.id.clone(),
            volume_capabilities: block_create_req("x", MIB, true).volume_capabilities,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: big.id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: i64::try_from(600 * MIB).unwrap(),
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // DeleteVolume again: it is gone, so OK.
    delete(&d, &big.id).await.unwrap();

    // The next page starts at the erasing row's place and skips it.
    let p2 = ctl
        .list_volumes(list(1, p1.next_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list_page(&p2), vec![c.id.clone()]);
    assert!(p2.next_token.is_empty(), "{:?}", p2.next_token);
    let all = ctl
        .list_volumes(list(0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list_page(&all), vec![a.id.clone(), c.id.clone()]);
    // Pages of one entry walk a, c and nothing else.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let p = ctl.list_volumes(list(1, token)).await.unwrap().into_inner();
        seen.extend(list_page(&p));
        if p.next_token.is_empty() {
            break;
        }
        token = p.next_token;
    }
    assert_eq!(seen, vec![a.id.clone(), c.id.clone()]);
    // Still reserved: neither free nor counted.
    assert_eq!(available(&d).await, total - 640 * MIB);

    // The operator's view keeps it.
    let out = std::process::Command::new(common::bin("pmemctl"))
        .arg("--admin-endpoint")
        .arg(format!("unix://{}", d.admin_sock().display()))
        .args(["--json", "volumes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let vols: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == big.id.as_str())
        .unwrap_or_else(|| panic!("{} not in pmemctl volumes: {vols}", big.id));
    assert_eq!(row["state"], "erasing", "{row}");
    assert_eq!(row["name"], format!("erasing:{}", big.id).as_str(), "{row}");

    delete(&d, &a.id).await.unwrap();
    delete(&d, &c.id).await.unwrap();
}

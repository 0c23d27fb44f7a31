//! Ledger and region identity over the real binary (issue 11, items 4, 5
//! and 7): a lost, emptied, replaced or symlinked ledger is refused with
//! recovery instructions and never hands one tenant's data to the next; a
//! deleted or replaced region is not re-created empty under its volumes but
//! reported lost until `pmemctl region forget|reinit`; orphan loop devices
//! are reserved. Root: loop devices over the sim region files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::util::{
    block_create_req, capacity, free_port, get_volume, list_regions, pmemctl_output, probe,
    read_at, reconcile_report, scrape, write_at,
};
use common::{Daemon, bin};
use pmem_proto::admin;
use pmem_proto::csi;
use tonic::Code;

const MIB: u64 = 1 << 20;
const MARK: u8 = 0xA7;

async fn create(d: &Daemon, name: &str, bytes: u64) -> admin::Volume {
    let v = d
        .controller()
        .await
        .create_volume(block_create_req(name, bytes, true))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}; log:\n{}", d.log()))
        .into_inner()
        .volume
        .unwrap();
    get_volume(d, &v.volume_id).await.unwrap()
}

/// Writes a 1 MiB marker at 32 MiB into the volume's block device.
fn write_marker(v: &admin::Volume) {
    write_at(&v.device, 32 * MIB, &[MARK; MIB as usize]);
}

/// The 1 MiB at 32 MiB of the volume's block device.
fn read_at_32m(v: &admin::Volume) -> Vec<u8> {
    read_at(&v.device, 32 * MIB, MIB as usize)
}

fn ledger(d: &Daemon) -> PathBuf {
    d.state_dir().join("ledger.db")
}

fn region_file(d: &Daemon, i: u32) -> PathBuf {
    d.state_dir().join("sim").join(format!("region{i}.img"))
}

/// Removes the ledger with its -wal and -shm files.
fn remove_ledger(d: &Daemon) {
    for s in ["", "-wal", "-shm"] {
        let mut p = ledger(d).into_os_string();
        p.push(s);
        let _ = std::fs::remove_file(p);
    }
}

/// Starts the daemon and waits until its admin socket answers (it may be
/// in recovery, never ready).
async fn spawn_recovering(d: &mut Daemon) {
    d.spawn_process().await;
    d.wait_admin().await;
}

async fn ledger_status(d: &Daemon) -> admin::LedgerStatusResponse {
    d.admin()
        .await
        .ledger_status(admin::Empty {})
        .await
        .unwrap()
        .into_inner()
}

fn pmemctl(d: &Daemon, args: &[&str]) -> (bool, String) {
    let out = pmemctl_output(d, args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The refusal a CSI call gets while the ledger is refused.
async fn assert_refused(d: &Daemon, name: &str) {
    let e = d
        .controller()
        .await
        .create_volume(block_create_req(name, 64 * MIB, true))
        .await
        .expect_err("a create over a refused ledger must fail");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("pmemctl ledger rebuild"), "{e}");
    assert!(e.message().contains("--reinitialize"), "{e}");
    assert!(!probe(d).await.unwrap_or(false), "Probe must not say ready");
    let st = ledger_status(d).await;
    assert!(!st.refused.is_empty());
    assert!(d.log().contains("LEDGER REFUSED"), "{}", d.log());
}

#[tokio::test]
async fn hostile_identity_lost_ledger_is_refused_and_rebuilt() {
    let mut d = Daemon::start(&[]).await;
    let a = create(&d, "tenantA", 64 * MIB).await;
    write_marker(&a);
    d.stop();
    remove_ledger(&d);

    spawn_recovering(&mut d).await;
    assert_refused(&d, "tenantB").await;
    let st = ledger_status(&d).await;
    assert!(
        st.refused.contains("has stamped no region"),
        "{}",
        st.refused
    );
    // Nothing was stamped or placed: the volume list is empty, capacity 0.
    assert_eq!(capacity(&d).await.available_capacity, 0);

    // A dry run lists tenantA's volume and writes nothing.
    let (ok, out) = pmemctl(&d, &["--json", "ledger", "rebuild"]);
    assert!(ok, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["applied"], false);
    let ids: Vec<&str> = j["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a.id.as_str()]);
    assert!(!ledger_status(&d).await.refused.is_empty());

    let (ok, out) = pmemctl(&d, &["ledger", "rebuild", "--apply"]);
    assert!(ok, "{out}");
    assert!(out.contains("rebuilt: 1 volumes"), "{out}");
    assert!(ledger_status(&d).await.refused.is_empty());
    d.wait_ready().await;

    // tenantA is back, with its data; tenantB never sees it.
    let back = get_volume(&d, &a.id).await.unwrap();
    assert_eq!(
        (back.region.as_str(), back.offset_bytes),
        (a.region.as_str(), a.offset_bytes)
    );
    assert_eq!(back.state, "ready");
    assert!(!back.device.is_empty(), "reconciliation records the device");
    assert_eq!(read_at_32m(&back), vec![MARK; MIB as usize]);
    let b = create(&d, "tenantB", 64 * MIB).await;
    assert!(
        b.region != a.region || b.offset_bytes != a.offset_bytes,
        "tenantB got tenantA's extent"
    );
    assert!(read_at_32m(&b).iter().all(|&x| x == 0));
    // And the state survives a restart without refusal.
    d.stop();
    d.spawn().await;
    assert_eq!(get_volume(&d, &a.id).await.unwrap().state, "ready");
}

#[tokio::test]
async fn hostile_identity_truncated_ledger_then_reinitialize_erases() {
    let mut d = Daemon::start(&["--sim-regions", "1"]).await;
    let a = create(&d, "tenantA", 64 * MIB).await;
    write_marker(&a);
    d.stop();
    remove_ledger(&d);
    std::fs::File::create(ledger(&d)).unwrap();
    spawn_recovering(&mut d).await;
    assert_refused(&d, "tenantB").await;
    d.stop();

    d.extra.push("--reinitialize".into());
    d.spawn().await;
    d.extra.pop();
    assert!(
        d.log().contains("--reinitialize: ERASING EVERY REGION"),
        "{}",
        d.log()
    );
    let vols = d
        .admin()
        .await
        .list_volumes(admin::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert!(vols.is_empty(), "{vols:?}");
    // tenantA's loop device is gone and its bytes are zero in the file.
    let rep = reconcile_report(&d).await;
    assert!(rep.orphans.is_empty(), "{:?}", rep.orphans);
    let buf = read_at(region_file(&d, 0), a.offset_bytes + 32 * MIB, MIB as usize);
    assert!(
        buf.iter().all(|&x| x == 0),
        "tenantA's data survived --reinitialize"
    );
    let b = create(&d, "tenantB", 64 * MIB).await;
    assert!(read_at_32m(&b).iter().all(|&x| x == 0));
    // Without the flag the next start serves normally.
    d.stop();
    d.spawn().await;
    assert!(ledger_status(&d).await.refused.is_empty());
}

#[tokio::test]
async fn hostile_identity_replaced_ledger_is_refused() {
    let mut d = Daemon::start(&["--sim-regions", "1"]).await;
    create(&d, "tenantA", 64 * MIB).await;
    d.stop();
    // Another node's (another state directory's) ledger copied over ours.
    let mut other = Daemon::start(&["--sim-regions", "1", "--sim-mode", "file-only"]).await;
    other.stop();
    remove_ledger(&d);
    std::fs::copy(ledger(&other), ledger(&d)).unwrap();
    spawn_recovering(&mut d).await;
    assert_refused(&d, "tenantB").await;
    let st = ledger_status(&d).await;
    assert!(st.refused.contains("was replaced"), "{}", st.refused);
}

#[tokio::test]
async fn hostile_identity_ledger_symlinks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let target = dir.path().join("elsewhere.db");
    std::os::unix::fs::symlink(&target, state.join("ledger.db")).unwrap();
    let run = |state: &Path| {
        Command::new(bin("pmem-agent"))
            .arg("--endpoint")
            .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
            .arg("--admin-endpoint")
            .arg(format!(
                "unix://{}",
                dir.path().join("admin.sock").display()
            ))
            .arg("--state-dir")
            .arg(state)
            .args([
                "--sim-regions",
                "1",
                "--sim-region-size",
                "64MiB",
                "--sim-mode",
                "file-only",
            ])
            .output()
            .unwrap()
    };
    let out = run(&state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert!(
        !target.exists(),
        "a ledger was created at the symlink's target"
    );
    // The -wal file as a symlink is refused too.
    std::fs::remove_file(state.join("ledger.db")).unwrap();
    std::os::unix::fs::symlink(&target, state.join("ledger.db-wal")).unwrap();
    let out = run(&state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("ledger.db-wal is a symbolic link"), "{err}");
    assert!(!target.exists());
    common::cleanup_dir(dir.path());
}

/// The lost-region assertions shared by both recovery paths.
async fn assert_lost(d: &Daemon, v: &admin::Volume) {
    let mut c = d.controller().await;
    let g = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = g.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal, "{}", cond.message);
    assert!(
        cond.message.contains("is lost") && cond.message.contains("region0"),
        "{}",
        cond.message
    );
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let e = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().unwrap().volume_id == v.id)
        .unwrap();
    let cond = e
        .status
        .as_ref()
        .unwrap()
        .volume_condition
        .as_ref()
        .unwrap();
    assert!(
        cond.abnormal && cond.message.contains("pmemctl region forget"),
        "{}",
        cond.message
    );
    let regions = list_regions(d).await;
    assert!(!regions[0].lost.is_empty());
    assert_eq!(regions[0].available_bytes, 0);
    assert!(regions[1].lost.is_empty());
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity as u64, regions[1].available_bytes);
    // Not placed there; the other region serves.
    let n = create(d, "elsewhere", 64 * MIB).await;
    assert_eq!(n.region, "region1");
    let e = c
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .expect_err("deleting a lost volume must wait for the operator");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(d.log().contains("region lost"), "{}", d.log());
}

#[tokio::test]
async fn hostile_identity_deleted_region_is_lost_until_forgotten() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(&["--metrics-address", &addr]).await;
    let v = create(&d, "data", 64 * MIB).await;
    assert_eq!(v.region, "region0");
    write_marker(&v);
    // Deleted while running; the restart must not re-create it empty.
    std::fs::remove_file(region_file(&d, 0)).unwrap();
    d.stop();
    d.spawn().await;
    assert!(!region_file(&d, 0).exists(), "region0.img was re-created");
    assert_lost(&d, &v).await;
    let m = scrape(port).await;
    assert!(m.contains("pmem_agent_volumes_lost 1"), "{m}");
    assert!(
        m.contains(r#"pmem_agent_region_lost{region="region0"} 1"#),
        "{m}"
    );
    let st = ledger_status(&d).await;
    assert!(st.lost_regions["region0"].contains("is gone"), "{st:?}");

    let (ok, out) = pmemctl(&d, &["region", "forget", "region0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&v.id),
        "forget lists the volumes it drops: {out}"
    );
    assert!(
        region_file(&d, 0).exists(),
        "a forgotten region is stamped anew"
    );
    assert!(ledger_status(&d).await.lost_regions.is_empty());
    // Only the new, empty region0 can hold a 1 GiB volume now.
    let w = create(&d, "fresh", 1024 * MIB).await;
    assert_eq!(w.region, "region0");
    assert!(read_at_32m(&w).iter().all(|&x| x == 0));
    let m = scrape(port).await;
    assert!(m.contains("pmem_agent_volumes_lost 0"), "{m}");
}

#[tokio::test]
async fn hostile_identity_replaced_region_is_lost_until_reinit() {
    let mut d = Daemon::start(&[]).await;
    let v = create(&d, "data", 64 * MIB).await;
    assert_eq!(v.region, "region0");
    write_marker(&v);
    d.stop();
    // The region file replaced by a copy without its identity (same size,
    // same data): not this ledger's region any more.
    let f = region_file(&d, 0);
    let copy = f.with_extension("copy");
    std::fs::copy(&f, &copy).unwrap();
    std::fs::rename(&copy, &f).unwrap();
    d.spawn().await;
    assert_lost(&d, &v).await;
    assert!(
        ledger_status(&d).await.lost_regions["region0"].contains("stamp is gone"),
        "{:?}",
        ledger_status(&d).await
    );
    let (ok, out) = pmemctl(&d, &["region", "reinit", "region0"]);
    assert!(!ok && out.contains("--yes"), "{out}");
    let (ok, out) = pmemctl(&d, &["region", "reinit", "region0", "--yes"]);
    assert!(ok, "{out}");
    assert!(out.contains(&v.id), "{out}");
    assert!(ledger_status(&d).await.lost_regions.is_empty());
    let buf = read_at(&f, v.offset_bytes + 32 * MIB, MIB as usize);
    assert!(buf.iter().all(|&x| x == 0), "reinit left data behind");
    let w = create(&d, "fresh", 1024 * MIB).await;
    assert_eq!(w.region, "region0");
}

#[tokio::test]
async fn hostile_identity_orphans_are_reserved_on_sim() {
    let mut d = Daemon::start(&["--sim-regions", "1"]).await;
    let a = create(&d, "orphaned", 512 * MIB).await;
    assert_eq!(a.offset_bytes, 0);
    d.stop();
    // The ledger keeps its identity but loses the row (as after a crash of
    // an older version, or a hand edit): the loop device is an orphan.
    {
        let c = rusqlite::Connection::open(ledger(&d)).unwrap();
        c.execute("DELETE FROM volumes WHERE id = ?1", [&a.id])
            .unwrap();
    }
    d.spawn().await;
    let rep = reconcile_report(&d).await;
    assert_eq!(rep.orphans.len(), 1, "{rep:?}");
    let regions = list_regions(&d).await;
    assert_eq!(
        regions[0].available_bytes,
        512 * MIB,
        "the orphan's extent is reserved"
    );
    assert!(regions[0].extents[0].reserved);
    let mut c = d.controller().await;
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity as u64, 512 * MIB);
    assert_eq!(cap.maximum_volume_size, Some((512 * MIB) as i64));
    let b = create(&d, "next", 512 * MIB).await;
    assert_eq!(b.offset_bytes, 512 * MIB);
    let e = c
        .create_volume(block_create_req("full", 16 * MIB, true))
        .await
        .expect_err("the node is full");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    // Removing the orphan frees its space again.
    d.admin()
        .await
        .reconcile(admin::ReconcileRequest {
            dry_run: false,
            remove_orphans: true,
        })
        .await
        .unwrap();
    let regions = list_regions(&d).await;
    assert_eq!(regions[0].available_bytes, 512 * MIB);
    assert!(!regions[0].extents[0].reserved);
}

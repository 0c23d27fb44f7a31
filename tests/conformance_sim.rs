//! The conformance binary (tests/conformance, `pmem-conformance`) against the
//! real agent on the sim backend (loop devices, real mkfs and mounts; root).
//! With `PMEM_TEST_ALLOCATOR=remote` (scripts/test's second pass) the agent
//! places volumes through its own pmem-allocd.

mod common;

use std::process::Command;

use common::Daemon;

/// Builds the conformance binary next to the agent's and returns its path.
fn conformance_bin() -> std::path::PathBuf {
    let agent = common::bin("pmem-agent");
    let dir = agent.parent().expect("target dir").to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "pmem-conformance",
        "--bin",
        "pmem-conformance",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("run cargo build").success(),
        "cargo build -p pmem-conformance failed"
    );
    dir.join("pmem-conformance")
}

/// The counts of one summary line of the report ("upstream: …").
/// The binary pointed at the daemon's socket, with its dirs under the
/// daemon's kubelet root.
fn against(bin: &std::path::Path, d: &Daemon) -> Command {
    let mut c = Command::new(bin);
    c.arg("--endpoint")
        .arg(d.csi_sock())
        .arg("--staging-dir")
        .arg(d.kpath("conformance/staging"))
        .arg("--target-dir")
        .arg(d.kpath("conformance/mount"));
    c
}

fn counts(out: &str, what: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{what}: ")))
        .unwrap_or_else(|| panic!("no {what} summary in:\n{out}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_sim() {
    assert!(
        common::is_root(),
        "the conformance run needs root (loop devices, mounts)"
    );
    let bin = conformance_bin();
    // Two 4 GiB regions: the expansion cases grow 512 MiB volumes to 1 GiB.
    let d = Daemon::start(&["--sim-region-size", "4GiB"]).await;
    assert_eq!(
        d.allocd.is_some(),
        common::remote_allocator(),
        "placement through pmem-allocd exactly when PMEM_TEST_ALLOCATOR=remote"
    );
    let out = Command::new(&bin)
        .arg("--endpoint")
        .arg(format!("unix://{}", d.csi_sock().display()))
        .arg("--staging-dir")
        .arg(d.kpath("conformance/staging"))
        .arg("--target-dir")
        .arg(d.kpath("conformance/mount"))
        .args([
            "--test-volume-size",
            "512Mi",
            "--test-volume-expand-size",
            "1Gi",
        ])
        // Each case starts once the last one's deleted volumes are erased:
        // sim grows a volume only in place, and best-fit placement may put
        // the expansion cases' volume in a hole that ends at the region's
        // end while earlier extents are still being erased (no room then).
        .arg("--admin-endpoint")
        .arg(format!("unix://{}", d.admin_sock().display()))
        .output()
        .expect("run pmem-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "pmem-conformance exited {}:\n{stdout}\n{stderr}\nagent log:\n{}",
        out.status,
        d.log()
    );
    // Sim advertises every capability but snapshots, clones, modify,
    // ControllerPublish and the group controller: 49 upstream specs run
    // (95 - 46 skipped), and the 8 RPCs of what it lacks answer Unimplemented.
    let up = counts(&stdout, "upstream");
    assert!(
        up.starts_with("49 passed, 0 failed, 46 skipped, 0 missing, 0 filtered out (95 specs)"),
        "upstream: {up}\n{stdout}"
    );
    let ours = counts(&stdout, "pmem");
    assert!(
        ours.starts_with("8 passed, 0 failed, 3 skipped, 0 missing"),
        "pmem: {ours}\n{stdout}"
    );
    // Nothing of the cases is left behind: every volume deleted.
    let mut ctl = d.controller().await;
    let left = ctl
        .list_volumes(pmem_proto::csi::ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner()
        .entries;
    assert!(left.is_empty(), "volumes left after the run: {left:?}");
}

/// A table row without a case, or a capability-skip row for a capability
/// the driver advertises, is "missing" and fails the run; it never passes.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_missing_rows_fail() {
    let bin = conformance_bin();
    let d = Daemon::start(&[]).await;
    let table = d.dir.path().join("table.tsv");
    std::fs::write(
        &table,
        "# a run of three rows\n\
         Identity Service / Probe / should return appropriate information\tidentity.probe\n\
         Made up / a spec without a case\tno.such.case\n\
         Made up / a spec for an advertised capability\tskip-unless controller:CREATE_DELETE_VOLUME\n",
    )
    .unwrap();
    let out = against(&bin, &d)
        .arg("--table")
        .arg(&table)
        .output()
        .expect("run pmem-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let up = counts(&stdout, "upstream");
    assert!(
        up.starts_with("1 passed, 0 failed, 0 skipped, 2 missing"),
        "upstream: {up}\n{stdout}"
    );
    assert!(stdout.contains("no case \"no.such.case\""), "{stdout}");
    // Every case of ours the table does not name is reported too.
    assert!(
        stdout.contains("MISSING - case \"node.lifecycle\" is not in the table"),
        "{stdout}"
    );
}

/// --focus and --skip choose specs by name; the rest is counted, not run.
#[tokio::test(flavor = "multi_thread")]
async fn conformance_focus_and_skip() {
    let bin = conformance_bin();
    let d = Daemon::start(&[]).await;
    let out = against(&bin, &d)
        .args(["--focus", "^Identity Service", "--skip", "Probe"])
        .output()
        .expect("run pmem-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let up = counts(&stdout, "upstream");
    assert!(
        up.starts_with("2 passed, 0 failed, 0 skipped, 0 missing, 93 filtered out"),
        "upstream: {up}\n{stdout}"
    );
}

//! Operating the daemon: the metrics endpoint, systemd notification, and
//! every pmemctl subcommand against a running daemon.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::util::{free_port, pmemctl_output, probe};
use common::{Daemon, bin};
use pmem_proto::csi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the first sample line starting with `prefix`.
fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{body}"))
}

#[tokio::test]
async fn operate_metrics_endpoint_tracks_capacity() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&["--sim-mode", "file-only", "--metrics-address", &addr]).await;
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    let (code, body) = http_get(port, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(port, "/nope").await.0, 404);

    let (_, before) = http_get(port, "/metrics").await;
    let avail = r#"pmem_agent_region_available_bytes{region="region0"}"#;
    assert_eq!(sample(&before, avail), f64::from(1u32 << 30));
    assert!(before.contains("pmem_agent_build_info{"), "{before}");

    let mut c = d.controller().await;
    c.create_volume(csi::CreateVolumeRequest {
        name: "m1".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 256 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, after) = http_get(port, "/metrics").await;
    let total: f64 = [0, 1]
        .iter()
        .map(|r| {
            sample(
                &after,
                &format!(r#"pmem_agent_region_available_bytes{{region="region{r}"}}"#),
            )
        })
        .sum();
    assert_eq!(
        total,
        f64::from(2u32 << 30) - f64::from(256u32 << 20),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"pmem_agent_volumes{state="ready",persistency="persistent"}"#
        ),
        1.0
    );
    assert!(
        after.contains(r#"csi_plugin_operations_seconds_count{driver_name="pmem-agent.csi",method_name="CreateVolume",grpc_status_code="Ok"} 1"#),
        "{after}"
    );
    // One durable commit for the create (its intent); the ready commit is
    // redoable and waits for no sync.
    assert!(sample(&after, "pmem_agent_ledger_commit_seconds_count") >= 1.0);
    assert!(
        after.contains(r#"pmem_agent_devices{kind="orphan"} 0"#),
        "{after}"
    );
}

#[tokio::test]
async fn operate_systemd_notify_ready_after_socket_serves() {
    let d0 = tempfile::tempdir().unwrap();
    let notify_path = d0.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut d = Daemon {
        dir: tempfile::Builder::new()
            .prefix("pmem-agent-test")
            .tempdir()
            .unwrap(),
        child: None,
        extra: vec!["--sim-mode".into(), "file-only".into()],
        node_id: "test-node".into(),
        allocd: None,
    };
    let log = std::fs::File::create(d.log_path()).unwrap();
    let child = d
        .command()
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(log)
        .spawn()
        .unwrap();
    d.child = Some(child);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // At READY=1 the CSI socket already serves and Probe says ready.
    let ready = probe(&d).await;
    assert_eq!(ready, Some(true));
    let st = d.stop();
    assert!(st.success(), "exit {st}; log:\n{}", d.log());
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

fn pmemctl(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = pmemctl_output(d, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn operate_pmemctl_every_subcommand() {
    let d = Daemon::start(&["--sim-regions", "1"]).await;
    let ok = |args: &[&str]| {
        let (code, out, err) = pmemctl(&d, args);
        assert_eq!(code, 0, "pmemctl {args:?}: {err}");
        out
    };
    assert!(ok(&["identity"]).contains("ready=true"));
    let regions = ok(&["regions"]);
    assert!(
        regions.contains("region0") && regions.contains("[...."),
        "{regions}"
    );
    let cap: serde_json::Value = serde_json::from_str(&ok(&["--json", "csi", "capacity"])).unwrap();
    assert_eq!(cap["available_capacity"], 1u64 << 30);
    let created: serde_json::Value = serde_json::from_str(&ok(&[
        "--json", "csi", "create", "cli-vol", "--size", "64MiB", "--block",
    ]))
    .unwrap();
    let id = created["volume_id"].as_str().unwrap().to_owned();
    assert_eq!(created["capacity_bytes"], 64u64 << 20);
    assert!(ok(&["csi", "list"]).contains(&id));
    assert!(ok(&["volumes"]).contains("cli-vol"));
    let vols: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "volumes", "--state", "ready"])).unwrap();
    assert_eq!(vols.as_array().unwrap().len(), 1);
    let one: serde_json::Value = serde_json::from_str(&ok(&["--json", "volume", &id])).unwrap();
    assert!(one["device"].as_str().unwrap().starts_with("/dev/loop"));
    let regions = ok(&["regions"]);
    assert!(regions.contains('#'), "used extent not drawn: {regions}");
    assert!(ok(&["reconcile"]).contains("dry run"));
    assert!(ok(&["reconcile", "--apply"]).contains("applied"));
    assert!(ok(&["orphans"]).starts_with("DEVICE"));
    let grown = ok(&["csi", "expand", &id, "128MiB"]);
    assert!(grown.contains(&(128u64 << 20).to_string()), "{grown}");
    // Node subcommands on the raw block volume (no mkfs needed).
    let staging = d.kpath("staging");
    let target = d.kpath("target");
    let (staging, target) = (staging.to_str().unwrap(), target.to_str().unwrap());
    assert!(ok(&["csi", "stage", &id, staging, "--block"]).contains("staged"));
    assert!(ok(&["csi", "publish", &id, staging, target, "--block"]).contains("published"));
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["csi", "stats", &id, target])).unwrap();
    assert_eq!(stats["usage"][0]["total"], 128u64 << 20, "{stats}");
    // Still published: delete is refused with the precise code.
    let (code, _, err) = pmemctl(&d, &["csi", "delete", &id]);
    assert_eq!(code, 2);
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(ok(&["csi", "unpublish", &id, target]).contains("unpublished"));
    assert!(ok(&["csi", "unstage", &id, staging]).contains("unstaged"));
    ok(&["csi", "delete", &id]);
    // An ephemeral inline volume: made at publish, gone at unpublish.
    let eph = d.kpath("eph");
    let eph = eph.to_str().unwrap();
    let ephemeral = |d: &Daemon| -> usize {
        let (code, out, err) = pmemctl(d, &["--json", "volumes", "--persistency", "ephemeral"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        // A deleted one may still be erasing in the background: it is gone
        // for the CO, only the operator's view shows it.
        v.as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] != "erasing")
            .count()
    };
    let published = ok(&[
        "csi",
        "publish",
        "csi-cli-eph",
        "",
        eph,
        "--fs",
        "ext4",
        "--ephemeral",
        "--context",
        "size=16MiB",
        "--context",
        "eraseAfter=false",
    ]);
    assert!(published.contains("published"), "{published}");
    assert_eq!(ephemeral(&d), 1);
    assert!(ok(&["csi", "unpublish", "csi-cli-eph", eph]).contains("unpublished"));
    assert_eq!(ephemeral(&d), 0);
    let (code, _, err) = pmemctl(&d, &["csi", "publish", "x", "", eph, "--context", "size"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not KEY=VALUE"), "{err}");
    // Errors: a precise gRPC code, and a clear message when nothing runs.
    let (code, _, err) = pmemctl(&d, &["volume", "pmem-nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("NotFound"), "{err}");
    let out = Command::new(bin("pmemctl"))
        .args([
            "--admin-endpoint",
            "unix:///nonexistent/admin.sock",
            "regions",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is pmem-agent running"));
}

#[tokio::test]
async fn operate_agent_without_its_allocator_daemon_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("pmem-agent"))
        .arg("--endpoint")
        .arg(format!("unix://{}/csi.sock", dir.path().display()))
        .arg("--admin-endpoint")
        .arg(format!("unix://{}/admin.sock", dir.path().display()))
        .arg("--allocator")
        .arg(format!("unix://{}/allocator.sock", dir.path().display()))
        .args(["--allocator-wait", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allocator") && err.contains("does not exist"),
        "{err}"
    );
}

//! The real binary over its socket: Identity, socket mode, stale socket
//! handling, refusal of a second daemon, and clean shutdown on SIGTERM.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::{Daemon, bin};
use pmem_proto::csi;
use pmem_proto::csi::plugin_capability::{Type, service};

#[tokio::test]
async fn identity_over_socket_and_clean_sigterm() {
    let mut d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut id = d.identity().await.unwrap();
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "pmem-agent.csi");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)));
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    let ready = id
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(ready, Some(true));

    for sock in [d.csi_sock(), d.admin_sock()] {
        let meta = std::fs::metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "{}",
            sock.display()
        );
    }
    let ledger = d.state_dir().join("ledger.db");
    assert_eq!(
        std::fs::metadata(&ledger).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let status = d.stop();
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(!d.csi_sock().exists(), "socket left behind");
    assert!(!d.admin_sock().exists(), "admin socket left behind");
    let log = d.log();
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("pmem-agent stopped"), "{log}");
    // The client above still holds its connection: shutdown must not wait
    // for idle connections, only for calls in flight.
    assert!(!log.contains("did not finish in time"), "{log}");
    drop(id);
    // Every CSI call is logged once with method and code.
    assert!(log.contains("method=\"Probe\""), "{log}");
}

#[tokio::test]
async fn second_daemon_is_refused_and_stale_socket_replaced() {
    let mut d = Daemon::start(&["--sim-mode", "file-only"]).await;
    // Same state dir and sockets: refused, the first keeps serving.
    let out = d.command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("locked by another process") || err.contains("in use"),
        "{err}"
    );
    assert!(
        d.identity()
            .await
            .unwrap()
            .probe(csi::ProbeRequest {})
            .await
            .is_ok()
    );

    // Crash: the socket file stays behind; a restart removes it and serves.
    d.kill();
    assert!(d.csi_sock().exists());
    d.spawn().await;
    assert!(d.log().contains("removing stale socket"));
    d.stop();
}

#[tokio::test]
async fn bad_flags_exit_with_usage_error() {
    let out = std::process::Command::new(bin("pmem-agent"))
        .args(["--endpoint", "tcp://0.0.0.0:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("endpoint"));
}

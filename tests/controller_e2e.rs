//! The CSI Controller over the real binary's socket: every validation error
//! with its exact code, capacity exactness, max_volumes_per_node, erase on
//! delete, pagination, expansion and volume condition.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use common::Daemon;
use pmem_proto::csi;
use pmem_proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn cap(access: AccessType, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(access),
    }
}

fn block() -> csi::VolumeCapability {
    cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter)
}

fn mount(fs: &str) -> csi::VolumeCapability {
    cap(
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        Mode::SingleNodeWriter,
    )
}

fn req(name: &str, required: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block()],
        ..Default::default()
    }
}

fn topo(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([("pmem-agent.csi/node".to_owned(), node.to_owned())]),
    }
}

async fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test]
async fn controller_e2e_create_validation_codes() {
    let d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut c = d.controller().await;
    let cases: Vec<(csi::CreateVolumeRequest, Code, &str)> = vec![
        (req("", MIB), Code::InvalidArgument, "name"),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                }),
                ..req("a", 0)
            },
            Code::InvalidArgument,
            "required_bytes",
        ),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 100 * MIB,
                    limit_bytes: 50 * MIB,
                }),
                ..req("a", 0)
            },
            Code::InvalidArgument,
            "limit_bytes",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![],
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![cap(
                    AccessType::Block(BlockVolume {}),
                    Mode::MultiNodeMultiWriter,
                )],
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![mount("btrfs")],
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "btrfs",
        ),
        (
            csi::CreateVolumeRequest {
                volume_capabilities: vec![csi::VolumeCapability {
                    access_mode: Some(AccessMode {
                        mode: Mode::SingleNodeWriter as i32,
                    }),
                    access_type: None,
                }],
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "access_type",
        ),
        (
            csi::CreateVolumeRequest {
                parameters: HashMap::from([("colour".to_owned(), "blue".to_owned())]),
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "colour",
        ),
        (
            csi::CreateVolumeRequest {
                parameters: HashMap::from([("Usage".to_owned(), "devdax".to_owned())]),
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "Usage",
        ),
        (
            csi::CreateVolumeRequest {
                accessibility_requirements: Some(csi::TopologyRequirement {
                    requisite: vec![topo("other-node")],
                    preferred: vec![],
                }),
                ..req("a", MIB)
            },
            Code::ResourceExhausted,
            "other-node",
        ),
        (
            csi::CreateVolumeRequest {
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 17 * MIB,
                    limit_bytes: 20 * MIB,
                }),
                ..req("a", 0)
            },
            Code::OutOfRange,
            "limit_bytes",
        ),
        (req("huge", 5 << 30), Code::ResourceExhausted, "largest"),
        (
            csi::CreateVolumeRequest {
                volume_content_source: Some(csi::VolumeContentSource { r#type: None }),
                ..req("a", MIB)
            },
            Code::InvalidArgument,
            "volume_content_source",
        ),
    ];
    for (i, (r, want, needle)) in cases.into_iter().enumerate() {
        let (got, msg) = code_of(c.create_volume(r).await).await;
        assert_eq!(got, want, "case {i}: {msg}");
        assert!(
            msg.contains(needle),
            "case {i}: message {msg:?} does not name {needle:?}"
        );
    }
    // Accepted: sidecar keys, case-insensitive parameters, our topology.
    let ok = c
        .create_volume(csi::CreateVolumeRequest {
            parameters: HashMap::from([
                ("csi.storage.k8s.io/pvc/name".to_owned(), "claim".to_owned()),
                ("USAGE".to_owned(), "fileio".to_owned()),
                ("eraseafter".to_owned(), "False".to_owned()),
            ]),
            accessibility_requirements: Some(csi::TopologyRequirement {
                requisite: vec![topo("other"), topo("test-node")],
                preferred: vec![topo("test-node")],
            }),
            ..req("good", 0)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(ok.capacity_bytes, 16 * MIB, "0 means the backend minimum");
    assert_eq!(ok.accessible_topology, vec![topo("test-node")]);
    assert_eq!(
        ok.volume_context.get("usage").map(String::as_str),
        Some("FileIO")
    );
    // Same name, incompatible parameters: AlreadyExists.
    let (code, msg) = code_of(c.create_volume(req("good", 0)).await).await;
    assert_eq!(code, Code::AlreadyExists, "{msg}");
}

#[tokio::test]
async fn controller_e2e_other_calls_and_codes() {
    let d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut c = d.controller().await;
    // Capabilities: exactly what works.
    let caps = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::controller_service_capability::{Type, rpc};
    let mut got: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    got.sort();
    let mut want = vec![
        rpc::Type::CreateDeleteVolume as i32,
        rpc::Type::ListVolumes as i32,
        rpc::Type::GetCapacity as i32,
        rpc::Type::GetVolume as i32,
        rpc::Type::VolumeCondition as i32,
        rpc::Type::ExpandVolume as i32,
    ];
    want.sort();
    assert_eq!(got, want);
    // Unsupported calls: Unimplemented.
    let e = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = c
        .create_snapshot(csi::CreateSnapshotRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    // Delete: empty id InvalidArgument; unknown id OK.
    let e = c
        .delete_volume(csi::DeleteVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "pmem-unknown".into(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();

    // ValidateVolumeCapabilities.
    let v = c
        .create_volume(req("v1", 32 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let e = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pmem-nope".into(),
            volume_capabilities: vec![block()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let ok = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![mount("ext4")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let no = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![cap(
                AccessType::Block(BlockVolume {}),
                Mode::MultiNodeReaderOnly,
            )],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());

    // ListVolumes pagination: stable order, tokens, bad token Aborted.
    for i in 2..=5 {
        c.create_volume(req(&format!("v{i}"), 16 * MIB))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0], v.volume_id);
    let e = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let e = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // ControllerGetVolume.
    let g = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.volume.unwrap().capacity_bytes, 32 * MIB);
    assert!(!g.status.unwrap().volume_condition.unwrap().abnormal);
    let e = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pmem-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // GetCapacity for another node is 0.
    let other = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topo("elsewhere")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.available_capacity, 0);
    let e = c
        .get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("bogus".to_owned(), "1".to_owned())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Expansion: in place when the neighbour extent is free, OutOfRange when not.
    let e = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pmem-nope".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // v1 (32 MiB) sits between other volumes: it cannot grow in place.
    let e = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(block()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("in place"), "{}", e.message());
    // The last volume has free space after it.
    let last = seen.last().unwrap().clone();
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: last.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 100 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount("xfs")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 112 * MIB);
    assert!(r.node_expansion_required);
}

/// Fill the node with volumes of exactly the reported maximum until it
/// reports 0; every number is checked against what CreateVolume then does.
/// The ids of one ListVolumes page, and its next token.
async fn page(
    c: &mut pmem_proto::csi::controller_client::ControllerClient<tonic::transport::Channel>,
    max: i32,
    token: &str,
) -> Result<(Vec<String>, String), tonic::Status> {
    let r = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        })
        .await?
        .into_inner();
    Ok((
        r.entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect(),
        r.next_token,
    ))
}

/// Keyset pages: a token names the last volume of its page, so a page goes
/// on after it even when it was deleted meanwhile, sees volumes created
/// between pages, never repeats one; tokens of another ledger or of no
/// format of ours are Aborted; max_entries 0 is everything, < 0 invalid.
#[tokio::test]
async fn controller_e2e_list_volumes_pages_by_key() {
    let d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut c = d.controller().await;
    let mut ids = Vec::new();
    for n in ["a", "b", "c", "d"] {
        let v = c
            .create_volume(req(n, 16 * MIB))
            .await
            .unwrap()
            .into_inner();
        ids.push(v.volume.unwrap().volume_id);
    }
    // Pages of one: exactly four, the last without a token.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (got, next) = page(&mut c, 1, &token).await.unwrap();
        assert_eq!(got.len(), 1, "page {pages}");
        seen.extend(got);
        pages += 1;
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!((pages, &seen), (4, &ids));
    assert_eq!(
        page(&mut c, 0, "").await.unwrap(),
        (ids.clone(), String::new())
    );
    let e = page(&mut c, -1, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("max_entries"), "{e}");
    // max_entries is checked before the token.
    let e = page(&mut c, -1, "garbage").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // The last volume of a page deleted, one created, before the next page.
    let (first, t) = page(&mut c, 2, "").await.unwrap();
    assert_eq!(first, ids[..2]);
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: ids[1].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c
        .create_volume(req("e", 16 * MIB))
        .await
        .unwrap()
        .into_inner();
    let e_id = e.volume.unwrap().volume_id;
    let (rest, next) = page(&mut c, 0, &t).await.unwrap();
    assert_eq!(rest, vec![ids[2].clone(), ids[3].clone(), e_id.clone()]);
    assert!(next.is_empty());
    let (two, t2) = page(&mut c, 2, &t).await.unwrap();
    assert_eq!(two, ids[2..4]);
    assert_eq!(
        page(&mut c, 2, &t2).await.unwrap(),
        (vec![e_id], String::new())
    );

    // Not a token of ours: Aborted, naming the field, the value bounded.
    let huge = "x".repeat(1 << 20);
    for bad in ["garbage", "1", "v1", "v1..1", &t.replace('.', ":"), &huge] {
        let e = page(&mut c, 1, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{bad:.40}: {e}");
        assert!(e.message().contains("starting_token"), "{e}");
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    }
    // A token another ledger issued (another daemon's) is Aborted too.
    let other = Daemon::start(&["--sim-mode", "file-only"]).await;
    let mut oc = other.controller().await;
    for n in ["x", "y"] {
        oc.create_volume(req(n, 16 * MIB)).await.unwrap();
    }
    let (_, foreign) = page(&mut oc, 1, "").await.unwrap();
    assert!(!foreign.is_empty());
    let e = page(&mut c, 1, &foreign).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("another ledger"), "{e}");
    // Its own daemon takes it.
    assert_eq!(page(&mut oc, 1, &foreign).await.unwrap().0.len(), 1);
}

#[tokio::test]
async fn controller_e2e_capacity_is_exact_until_full() {
    let d = Daemon::start(&[
        "--sim-mode",
        "file-only",
        "--sim-regions",
        "2",
        "--sim-slots",
        "3",
    ])
    .await;
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(info.accessible_topology, Some(topo("test-node")));
    // 2 regions × min(3 slots, 1 GiB / 16 MiB) = 6.
    assert_eq!(info.max_volumes_per_node, 6);

    let mut ids = Vec::new();
    // A small volume first, so the maxima differ between regions.
    ids.push(
        c.create_volume(req("small", 16 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id,
    );
    for i in 0.. {
        let cap = c
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
        let max = cap.maximum_volume_size.unwrap();
        if max == 0 {
            break;
        }
        assert!(i < 10, "never filled up");
        assert!(cap.available_capacity >= max);
        assert_eq!(cap.minimum_volume_size, Some(16 * MIB));
        // One alignment step more fails with ResourceExhausted...
        let e = c
            .create_volume(req(&format!("over{i}"), max + 16 * MIB))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        // ...exactly the maximum succeeds.
        let v = c
            .create_volume(req(&format!("max{i}"), max))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, max);
        ids.push(v.volume_id);
    }
    let info = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.max_volumes_per_node,
        ids.len() as i64,
        "full node: only what exists"
    );
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, 0);
    let e = c
        .create_volume(req("one-more", 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // Deleting frees capacity and volume slots again.
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: ids.pop().unwrap(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    let info2 = n
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info2.max_volumes_per_node > info.max_volumes_per_node - 1);
    // The capacity comes back once the background erase of the extent is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let cap = c
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
        if cap.maximum_volume_size.unwrap() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "capacity never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A known pattern does not survive into the next volume on the same extent:
/// every deleted volume is erased (in the background), eraseAfter=false
/// included, unless the node is declared single-tenant.
#[tokio::test]
async fn controller_e2e_erase_after_delete() {
    for (erase, single_tenant) in [(true, false), (false, false), (false, true)] {
        let mut extra = vec!["--sim-regions", "1"];
        if single_tenant {
            extra.push("--allow-unerased-reuse");
        }
        let d = Daemon::start(&extra).await;
        let mut c = d.controller().await;
        let mut admin = d.admin().await;
        let v = c
            .create_volume(csi::CreateVolumeRequest {
                parameters: HashMap::from([("eraseAfter".to_owned(), erase.to_string())]),
                ..req("victim", 64 * MIB)
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let get = |id: String| pmem_proto::admin::GetVolumeRequest { volume_id: id };
        let info = admin
            .get_volume(get(v.volume_id.clone()))
            .await
            .unwrap()
            .into_inner();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&info.device)
            .unwrap();
        let pattern = vec![0x5Au8; 1 << 20];
        f.write_all_at(&pattern, 0).unwrap();
        f.write_all_at(&pattern, 32 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        // The extent is free once the background erase is done.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while admin.get_volume(get(v.volume_id.clone())).await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "erase never finished");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let w = c
            .create_volume(req("next", 64 * MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let winfo = admin
            .get_volume(get(w.volume_id.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(winfo.offset_bytes, info.offset_bytes, "same extent reused");
        let f = std::fs::File::open(&winfo.device).unwrap();
        for at in [0, 32 << 20] {
            let mut buf = vec![0u8; 1 << 20];
            f.read_exact_at(&mut buf, at).unwrap();
            if single_tenant {
                assert_eq!(
                    buf, pattern,
                    "single-tenant eraseAfter=false should not have zeroed the data"
                );
            } else {
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "data survived eraseAfter={erase}"
                );
            }
        }
        // An open device refuses the delete.
        drop(f);
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: w.volume_id,
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
}

/// A volume whose device vanished is reported abnormal by ControllerGetVolume.
#[tokio::test]
async fn controller_e2e_volume_condition_when_device_missing() {
    let d = Daemon::start(&["--sim-regions", "1"]).await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(req("v", 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let info = d
        .admin()
        .await
        .get_volume(pmem_proto::admin::GetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let st = std::process::Command::new("losetup")
        .args(["-d", &info.device])
        .status()
        .unwrap();
    assert!(st.success());
    let g = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = g.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("missing"), "{}", cond.message);
    // Reconciliation restores it.
    let rep = d
        .admin()
        .await
        .reconcile(pmem_proto::admin::ReconcileRequest {
            dry_run: false,
            remove_orphans: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rep.actions.iter().any(|a| a.contains("restore")), "{rep:?}");
    let g = c
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!g.status.unwrap().volume_condition.unwrap().abnormal);
}

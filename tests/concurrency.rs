//! Concurrent CreateVolume calls against the real daemon.

mod common;

use pmem_proto::csi;
use tonic::Code;

fn block_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, access_mode::Mode};
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_cap()],
        ..Default::default()
    }
}

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_same_name_yields_one_volume() {
    let d = common::Daemon::start(&["--sim-regions", "2"]).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut c = d.controller().await;
        tasks.push(tokio::spawn(async move {
            c.create_volume(create("same", 100 * MIB))
                .await
                .map(|r| r.into_inner().volume.unwrap())
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap().expect("every identical create succeeds");
        assert_eq!(v.capacity_bytes, 112 * MIB);
        ids.insert(v.volume_id);
    }
    assert_eq!(ids.len(), 1, "identical creates made {} volumes", ids.len());
    let vols = d
        .admin()
        .await
        .list_volumes(pmem_proto::admin::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 1);
    // The same name with an incompatible size is a conflict.
    let e = d
        .controller()
        .await
        .create_volume(create("same", 500 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_distinct_names_never_overlap_or_overcommit() {
    // One region of 1 GiB, filled until 16 × 16 MiB are left.
    let d = common::Daemon::start(&["--sim-regions", "1"]).await;
    let mut c = d.controller().await;
    c.create_volume(create("filler", 768 * MIB)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = d.controller().await;
        tasks.push(tokio::spawn(async move {
            c.create_volume(create(&format!("v{i}"), 16 * MIB)).await
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((ok, exhausted), (16, 16));
    let mut admin = d.admin().await;
    let vols = admin
        .list_volumes(pmem_proto::admin::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(vols.len(), 17);
    let mut extents: Vec<(u64, u64)> = vols
        .iter()
        .map(|v| (v.offset_bytes, v.size_bytes))
        .collect();
    extents.sort();
    for w in extents.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    let end = extents.last().map(|(o, s)| o + s).unwrap();
    assert!(end <= 1 << 30, "volume beyond the region end");
    let regions = admin
        .list_regions(pmem_proto::admin::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .regions;
    assert_eq!(regions[0].available_bytes, 0);
    let cap = c
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, 0);
    assert_eq!(cap.maximum_volume_size, Some(0));
}

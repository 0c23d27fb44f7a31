//! Helpers the integration suites share: requests, block-device I/O,
//! mounts, metrics, polling, and the kubelet's paths under a daemon's root.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pmem_agent::mount::mountinfo::{self, MountEntry};
use pmem_proto::admin;
use pmem_proto::csi;
use pmem_proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use super::Daemon;

/// The CSI driver name the kubelet's paths carry.
pub const DRIVER: &str = "pmem-agent.csi";

/// A single-node-writer raw block capability.
pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A single-node-writer filesystem capability.
pub fn mount_cap(fs: &str, flags: &[&str]) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

/// CreateVolume of a raw block volume of exactly `bytes` with the given
/// `eraseAfter` parameter.
pub fn block_create_req(name: &str, bytes: u64, erase_after: bool) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: i64::try_from(bytes).unwrap(),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block_cap()],
        parameters: [("eraseAfter".to_owned(), erase_after.to_string())].into(),
        ..Default::default()
    }
}

/// The ledger's view of a volume, `None` once its row is gone.
pub async fn get_volume(d: &Daemon, id: &str) -> Option<admin::Volume> {
    match d
        .admin()
        .await
        .get_volume(admin::GetVolumeRequest {
            volume_id: id.to_owned(),
        })
        .await
    {
        Ok(v) => Some(v.into_inner()),
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("get volume {id}: {s}"),
    }
}

/// A dry-run reconcile report (nothing is changed).
pub async fn reconcile_report(d: &Daemon) -> admin::ReconcileReport {
    d.admin()
        .await
        .reconcile(admin::ReconcileRequest {
            dry_run: true,
            remove_orphans: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The admin API's regions.
pub async fn list_regions(d: &Daemon) -> Vec<admin::Region> {
    d.admin()
        .await
        .list_regions(admin::ListRegionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .regions
}

/// Writes `data` at byte `at` of a device or file and syncs it.
pub fn write_at(dev: impl AsRef<Path>, at: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, at).unwrap();
    f.sync_all().unwrap();
}

/// `len` bytes at byte `at` of a device or file.
pub fn read_at(dev: impl AsRef<Path>, at: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at).unwrap();
    buf
}

/// Opens a block device with O_EXCL, as a mount holds it.
pub fn open_excl(dev: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
}

/// `lo_file_name` of a loop device ("" when it is not attached).
pub fn loop_name(dev: &str) -> String {
    pmem_allocator::loopdev::list()
        .unwrap()
        .into_iter()
        .find(|l| l.path.display().to_string() == dev)
        .map(|l| l.name)
        .unwrap_or_default()
}

/// A path as a request field.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// This process's mount table.
pub fn mounts() -> Vec<MountEntry> {
    mountinfo::parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()).unwrap()
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon's /metrics page (with the HTTP head).
pub async fn scrape(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of the sample `name` in a metrics page.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// The value of the sample `name` on the daemon's /metrics.
pub async fn metric(port: u16, name: &str) -> f64 {
    sample(&scrape(port).await, name)
}

/// Polls `cond` until it holds; the deadline only bounds a hang (it asserts
/// no speed), and its panic names `what` and shows the daemon's log.
pub async fn wait_until(d: &Daemon, what: &str, secs: u64, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "{what} not within {secs}s; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Daemon {
    /// Where the kubelet stages a volume; the directory exists, as the
    /// kubelet makes it before NodeStageVolume.
    pub fn staging_of(&self, name: &str) -> PathBuf {
        let p = self.kpath(&format!(
            "plugins/kubernetes.io/csi/{DRIVER}/{name}/globalmount"
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Where the kubelet publishes a volume into a pod; its parent exists,
    /// as the kubelet makes it before NodePublishVolume.
    pub fn target_of(&self, pod: &str, name: &str) -> PathBuf {
        let p = self.kpath(&format!(
            "pods/{pod}/volumes/kubernetes.io~csi/{name}/mount"
        ));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }
}

/// Runs `pmemctl` against the daemon's two sockets.
pub fn pmemctl_output(d: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(super::bin("pmemctl"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.csi_sock().display()))
        .arg("--admin-endpoint")
        .arg(format!("unix://{}", d.admin_sock().display()))
        .args(args)
        .output()
        .unwrap()
}

/// GetCapacity over every region, any capability.
pub async fn capacity(d: &Daemon) -> csi::GetCapacityResponse {
    d.controller()
        .await
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// What Probe says about readiness.
pub async fn probe(d: &Daemon) -> Option<bool> {
    d.identity()
        .await
        .unwrap()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready
}

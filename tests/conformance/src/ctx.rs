//! What every case sees: the gRPC clients, the configuration, the driver's
//! advertised capabilities, and the volumes a case made (deleted after it).

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pmem_proto::admin::admin_client::AdminClient;
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::controller_service_capability::rpc::Type as CtlCap;
use pmem_proto::csi::group_controller_client::GroupControllerClient;
use pmem_proto::csi::identity_client::IdentityClient;
use pmem_proto::csi::node_client::NodeClient;
use pmem_proto::csi::node_service_capability::rpc::Type as NodeCap;
use pmem_proto::csi::plugin_capability::service::Type as PluginCap;
use pmem_proto::csi::volume_capability::access_mode::Mode;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Response, Status};

/// Why a case stopped before its end.
#[derive(Debug)]
pub enum Stop {
    Fail(String),
    Skip(String),
}

pub type Step<T = ()> = Result<T, Stop>;

#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::ctx::Stop::Fail(format!($($fmt)+)));
        }
    };
}

/// A capability a case needs (or whose absence it checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Plugin(PluginCap),
    Controller(CtlCap),
    Node(NodeCap),
}

impl Need {
    /// `plugin:NAME`, `controller:NAME` or `node:NAME` with the spec's enum name.
    pub fn parse(s: &str) -> Result<Need, String> {
        let (kind, name) = s
            .split_once(':')
            .ok_or_else(|| format!("capability {s:?} is not KIND:NAME"))?;
        let bad = || format!("unknown {kind} capability {name:?}");
        match kind {
            "plugin" => PluginCap::from_str_name(name)
                .map(Need::Plugin)
                .ok_or_else(bad),
            "controller" => CtlCap::from_str_name(name)
                .map(Need::Controller)
                .ok_or_else(bad),
            "node" => NodeCap::from_str_name(name).map(Need::Node).ok_or_else(bad),
            _ => Err(format!(
                "capability kind {kind:?} is not plugin, controller or node"
            )),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Need::Plugin(t) => format!("plugin:{}", t.as_str_name()),
            Need::Controller(t) => format!("controller:{}", t.as_str_name()),
            Need::Node(t) => format!("node:{}", t.as_str_name()),
        }
    }
}

/// What the driver advertised.
#[derive(Debug, Default)]
pub struct Caps {
    pub plugin: HashSet<i32>,
    pub controller: HashSet<i32>,
    pub node: HashSet<i32>,
}

impl Caps {
    pub fn has(&self, n: Need) -> bool {
        match n {
            Need::Plugin(t) => self.plugin.contains(&(t as i32)),
            Need::Controller(t) => self.controller.contains(&(t as i32)),
            Need::Node(t) => self.node.contains(&(t as i32)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub staging_dir: PathBuf,
    pub target_dir: PathBuf,
    pub params: HashMap<String, String>,
    pub volume_size: i64,
    pub expand_size: i64,
    pub idempotency: usize,
    pub block: bool,
}

#[derive(Debug)]
pub struct Ctx {
    /// pmem-agent's admin service, when given: see [`Ctx::settle`].
    admin: Option<AdminClient<Channel>>,
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    group: GroupControllerClient<Channel>,
    pub cfg: Config,
    pub caps: Caps,
    /// Volumes made by the running case, in creation order (one entry per
    /// successful CreateVolume, as a client would retry each).
    volumes: Mutex<Vec<String>>,
}

/// Connects to `unix:///path` or a bare socket path.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, String> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    let shown = path.display().to_string();
    Endpoint::from_static("http://csi.local")
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connect to {shown}: {e}"))
}

fn status_line(s: &Status) -> String {
    let mut m = s.message().to_owned();
    if m.len() > 300 {
        let mut end = 300;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
        m.push('…');
    }
    format!("{:?}: {m}", s.code())
}

/// The call succeeded; its response.
pub fn must<T>(r: Result<Response<T>, Status>, what: &str) -> Step<T> {
    r.map(Response::into_inner)
        .map_err(|s| Stop::Fail(format!("{what} failed: {}", status_line(&s))))
}

/// The call failed with exactly `code`.
pub fn expect_code<T: Debug>(r: Result<Response<T>, Status>, code: Code, what: &str) -> Step {
    match r {
        Ok(resp) => Err(Stop::Fail(format!(
            "{what}: succeeded ({:?}), expected {code:?}",
            resp.into_inner()
        ))),
        Err(s) if s.code() == code => Ok(()),
        Err(s) => Err(Stop::Fail(format!(
            "{what}: expected {code:?}, got {}",
            status_line(&s)
        ))),
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name no earlier run used: `prefix-<pid><time><counter>` in hex.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{prefix}-{:x}{t:x}{n:x}", std::process::id())
}

/// [`unique`], padded to exactly `len` bytes.
pub fn unique_len(prefix: &str, len: usize) -> String {
    let mut s = unique(prefix);
    s.truncate(len);
    while s.len() < len {
        s.push('0');
    }
    s
}

/// An id in valid form that names nothing.
pub fn fake_volume_id() -> String {
    unique("fake-vol-id")
}

pub fn fake_node_id() -> String {
    unique("fake-node-id")
}

/// An id the driver may consider malformed.
pub const INVALID_VOLUME_ID: &str = "fake-vol-id";

impl Ctx {
    pub fn new(ch: Channel, admin: Option<Channel>, cfg: Config) -> Ctx {
        Ctx {
            admin: admin.map(AdminClient::new),
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch.clone()),
            group: GroupControllerClient::new(ch),
            cfg,
            caps: Caps::default(),
            volumes: Mutex::new(Vec::new()),
        }
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        self.identity.clone()
    }
    pub fn ctl(&self) -> ControllerClient<Channel> {
        self.controller.clone()
    }
    pub fn node(&self) -> NodeClient<Channel> {
        self.node.clone()
    }
    pub fn group(&self) -> GroupControllerClient<Channel> {
        self.group.clone()
    }

    pub fn has(&self, n: Need) -> bool {
        self.caps.has(n)
    }

    /// Reads the three capability lists the cases are chosen by.
    pub async fn load_caps(&mut self) -> Result<(), String> {
        let p = self
            .identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .map_err(|s| format!("GetPluginCapabilities: {}", status_line(&s)))?
            .into_inner();
        for c in p.capabilities {
            if let Some(csi::plugin_capability::Type::Service(s)) = c.r#type {
                self.caps.plugin.insert(s.r#type);
            }
        }
        if self.has(Need::Plugin(PluginCap::ControllerService)) {
            let c = self
                .ctl()
                .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await
                .map_err(|s| format!("ControllerGetCapabilities: {}", status_line(&s)))?
                .into_inner();
            for c in c.capabilities {
                if let Some(csi::controller_service_capability::Type::Rpc(r)) = c.r#type {
                    self.caps.controller.insert(r.r#type);
                }
            }
        }
        let n = self
            .node()
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .map_err(|s| format!("NodeGetCapabilities: {}", status_line(&s)))?
            .into_inner();
        for c in n.capabilities {
            if let Some(csi::node_service_capability::Type::Rpc(r)) = c.r#type {
                self.caps.node.insert(r.r#type);
            }
        }
        Ok(())
    }

    /// The test capability: mount (or block with `--test-volume-access-type
    /// block`) with `mode`.
    pub fn cap(&self, mode: Mode) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(if self.cfg.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
        }
    }

    pub fn snw(&self) -> csi::VolumeCapability {
        self.cap(Mode::SingleNodeWriter)
    }

    /// The suite's standard create request: one single-node-writer
    /// capability, required_bytes = the test size, the test parameters.
    pub fn create_req(&self, name: &str) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.to_owned(),
            volume_capabilities: vec![self.snw()],
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.cfg.volume_size,
                limit_bytes: 0,
            }),
            parameters: self.cfg.params.clone(),
            ..Default::default()
        }
    }

    pub fn staging(&self) -> String {
        self.cfg.staging_dir.display().to_string()
    }

    /// The publish path: `target` below the target directory (the driver
    /// makes and removes it).
    pub fn target(&self) -> String {
        self.cfg.target_dir.join("target").display().to_string()
    }

    pub fn target_named(&self, name: &str) -> String {
        self.cfg.target_dir.join(name).display().to_string()
    }

    /// CreateVolume, remembering a volume it returns for the cleanup.
    pub async fn create_volume(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = self.ctl().create_volume(req).await;
        if let Ok(resp) = &r
            && let Some(v) = &resp.get_ref().volume
            && !v.volume_id.is_empty()
        {
            self.volumes
                .lock()
                .expect("volumes lock")
                .push(v.volume_id.clone());
        }
        r
    }

    /// CreateVolume that must succeed with a volume and an id.
    pub async fn must_create(&self, req: csi::CreateVolumeRequest) -> Step<csi::Volume> {
        let name = req.name.clone();
        let r = must(
            self.create_volume(req).await,
            &format!("CreateVolume {name:?}"),
        )?;
        let v = r.volume.ok_or_else(|| {
            Stop::Fail(format!("CreateVolume {name:?}: no volume in the response"))
        })?;
        ensure!(
            !v.volume_id.is_empty(),
            "CreateVolume {name:?}: empty volume_id"
        );
        Ok(v)
    }

    /// DeleteVolume, forgetting the volume when it succeeds.
    pub async fn delete_volume(
        &self,
        id: &str,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = self
            .ctl()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await;
        if r.is_ok() {
            let mut v = self.volumes.lock().expect("volumes lock");
            if let Some(i) = v.iter().position(|x| x == id) {
                v.remove(i);
            }
        }
        r
    }

    pub async fn node_info(&self) -> Step<csi::NodeGetInfoResponse> {
        let ni = must(
            self.node().node_get_info(csi::NodeGetInfoRequest {}).await,
            "NodeGetInfo",
        )?;
        ensure!(!ni.node_id.is_empty(), "NodeGetInfo: empty node_id");
        Ok(ni)
    }

    /// NodeStageVolume when the driver has the stage capability.
    pub async fn stage(&self, v: &csi::Volume, cap: &csi::VolumeCapability) -> Step {
        if !self.has(Need::Node(NodeCap::StageUnstageVolume)) {
            return Ok(());
        }
        must(
            self.node()
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    volume_capability: Some(cap.clone()),
                    staging_target_path: self.staging(),
                    volume_context: v.volume_context.clone(),
                    ..Default::default()
                })
                .await,
            &format!("NodeStageVolume {}", v.volume_id),
        )?;
        Ok(())
    }

    pub fn publish_req(
        &self,
        v: &csi::Volume,
        cap: &csi::VolumeCapability,
        target: String,
    ) -> csi::NodePublishVolumeRequest {
        let staged = self.has(Need::Node(NodeCap::StageUnstageVolume));
        csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: target,
            staging_target_path: if staged {
                self.staging()
            } else {
                String::new()
            },
            volume_capability: Some(cap.clone()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        }
    }

    pub async fn publish(&self, v: &csi::Volume, cap: &csi::VolumeCapability) -> Step {
        must(
            self.node()
                .node_publish_volume(self.publish_req(v, cap, self.target()))
                .await,
            &format!("NodePublishVolume {}", v.volume_id),
        )?;
        Ok(())
    }

    /// Creates the staging and target directories before a case, as the
    /// upstream suite does (each must not exist yet, or be empty).
    pub fn make_dirs(&self) -> Result<(), String> {
        for d in [&self.cfg.staging_dir, &self.cfg.target_dir] {
            if let Some(parent) = d.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("create {}: {e}", parent.display()))?;
            }
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let empty = std::fs::read_dir(d)
                        .map_err(|e| format!("read {}: {e}", d.display()))?
                        .next()
                        .is_none();
                    if !empty || !std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()) {
                        return Err(format!(
                            "{} exists and is not an empty directory",
                            d.display()
                        ));
                    }
                }
                Err(e) => return Err(format!("create {}: {e}", d.display())),
            }
        }
        Ok(())
    }

    /// Removes both directories after a case. Never recursive: what the
    /// driver left behind (a mount, a target it did not remove) is a failure,
    /// not something to delete.
    pub fn remove_dirs(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        for d in [&self.cfg.staging_dir, &self.cfg.target_dir] {
            if let Err(e) = rmdir(d) {
                errs.push(e);
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// The upstream suite's cleanup after each case: for every volume made,
    /// last first, NodeUnpublishVolume of the target, NodeUnstageVolume of the
    /// staging path (NotFound is fine for both), then DeleteVolume.
    pub async fn cleanup(&self) -> Result<(), String> {
        let vols: Vec<String> = std::mem::take(&mut *self.volumes.lock().expect("volumes lock"));
        let staged = self.has(Need::Node(NodeCap::StageUnstageVolume));
        let mut errs = Vec::new();
        for id in vols.iter().rev() {
            let r = self
                .node()
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: self.target(),
                })
                .await;
            if let Err(s) = r
                && s.code() != Code::NotFound
            {
                errs.push(format!("NodeUnpublishVolume {id}: {}", status_line(&s)));
            }
            if staged {
                let r = self
                    .node()
                    .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: self.staging(),
                    })
                    .await;
                if let Err(s) = r
                    && s.code() != Code::NotFound
                {
                    errs.push(format!("NodeUnstageVolume {id}: {}", status_line(&s)));
                }
            }
            let r = self
                .ctl()
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await;
            if let Err(s) = r {
                errs.push(format!("DeleteVolume {id}: {}", status_line(&s)));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(format!("cleanup failed: {}", errs.join("; ")))
        }
    }
}

impl Ctx {
    /// With pmem-agent's admin endpoint: waits until no deleted volume is
    /// still being deleted or erased (admin ListVolumes), so that every
    /// case starts from the same layout whatever the eraser's pace. Without
    /// it, cases follow each other at once, as in the upstream suite.
    pub async fn settle(&self) -> Result<(), String> {
        let Some(admin) = &self.admin else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let n = match Self::unsettled(&mut admin.clone()).await {
                Ok(n) => n,
                // pmem-agent's admin ListVolumes through pmem-allocd answers
                // NotFound when a volume goes while it lists: not settled yet.
                Err((Code::NotFound, _)) => 1,
                Err((_, e)) => return Err(e),
            };
            if n == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{n} deleted volumes or their extents still held after 120 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The regions' extents (with the admin endpoint), for a failure report.
    pub async fn layout(&self) -> Option<String> {
        let admin = self.admin.as_ref()?;
        let regions = match admin
            .clone()
            .list_regions(pmem_proto::admin::ListRegionsRequest::default())
            .await
        {
            Ok(r) => r.into_inner().regions,
            Err(s) => return Some(format!("(admin ListRegions: {})", status_line(&s))),
        };
        let mut out = Vec::new();
        for r in regions {
            let ex: Vec<String> = r
                .extents
                .iter()
                .map(|e| {
                    let who = if e.volume_id.is_empty() {
                        "free".to_owned()
                    } else {
                        format!("{} {}", e.volume_id, e.state)
                    };
                    format!("{}+{} {who}", e.offset_bytes >> 20, e.size_bytes >> 20)
                })
                .collect();
            out.push(format!("{} [MiB]: {}", r.id, ex.join(", ")));
        }
        Some(out.join("\n    "))
    }

    /// Volumes being deleted or erased, and extents still held for a volume
    /// that is gone or going.
    async fn unsettled(admin: &mut AdminClient<Channel>) -> Result<usize, (Code, String)> {
        let gone = |state: &str| state == "deleting" || state == "erasing";
        let vols = admin
            .list_volumes(pmem_proto::admin::ListVolumesRequest::default())
            .await
            .map_err(|s| (s.code(), format!("admin ListVolumes: {}", status_line(&s))))?
            .into_inner()
            .volumes;
        let live: HashSet<&str> = vols
            .iter()
            .filter(|v| !gone(&v.state))
            .map(|v| v.id.as_str())
            .collect();
        let regions = admin
            .list_regions(pmem_proto::admin::ListRegionsRequest::default())
            .await
            .map_err(|s| (s.code(), format!("admin ListRegions: {}", status_line(&s))))?
            .into_inner()
            .regions;
        let held = regions
            .iter()
            .flat_map(|r| &r.extents)
            .filter(|e| !e.volume_id.is_empty() && !live.contains(e.volume_id.as_str()))
            .count();
        Ok(vols.len() - live.len() + held)
    }
}

fn rmdir(d: &Path) -> Result<(), String> {
    match std::fs::remove_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            let left: Vec<String> = std::fs::read_dir(d)
                .map(|it| {
                    it.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            Err(format!(
                "remove {}: {e} (left behind: {})",
                d.display(),
                left.join(", ")
            ))
        }
    }
}

//! CSI Node service: stages volumes (formats and mounts them, or just
//! records block volumes), publishes them into pods with bind mounts, serves
//! CSI ephemeral inline volumes, reports usage and condition, and grows
//! filesystems. The operating system sits behind [`Host`]; the ledger
//! records every stage and publish so DeleteVolume can refuse while a
//! volume is in use and a repeated call can be recognised.
//!
//! Idempotency: a repeated call that matches what the ledger and the mount
//! table show succeeds without touching anything; one that conflicts with
//! it fails with ALREADY_EXISTS. Calls on one volume are serialised; a call
//! arriving while another on the same volume runs gets ABORTED, as the CSI
//! spec recommends.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::MsFlags;
use pmem_allocator::units::parse_size;
use pmem_allocator::{
    Bytes, CreateRequest, Persistency, Publication, PublicationKind, Usage, Volume, VolumeState,
};
use pmem_proto::csi;
use pmem_proto::csi::node_server::Node;
use pmem_proto::csi::node_service_capability::{self, rpc};
use pmem_proto::csi::volume_capability::AccessType;
use pmem_proto::csi::volume_capability::access_mode::Mode;
use pmem_proto::csi::volume_usage::Unit;
use tonic::{Request, Response, Status};

use crate::csi::params::{
    Access, Capability, FsType, check_id, check_map, check_path_lengths, node_topology,
    parse_capability, parse_parameters_with, parse_range,
};
use crate::driver::{Driver, VolumeGuard};
use crate::error::{AgentError, AgentResult, invalid};
use crate::mount::confine::quote;
use crate::mount::host::RealHost;
use crate::mount::{
    BindSource, Confined, Host, KubeletRoot, Leaf, MountEntry, MountError, MountSpec, PathError,
    PathState, Probe, Removed, Unmounted, XFS_MIN_BYTES, parse_options, paths,
};
use crate::rpc::{blocking, call};

mod reconcile;
#[cfg(test)]
mod tests;

pub use reconcile::{
    CollectReport, NodeReconcileLog, RECOVERED, ScanReport, collect_ephemeral, path_shape,
    recovered, same_capability, scan_mounts, spawn_collector,
};

/// The node RPCs we implement and advertise.
const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::StageUnstageVolume,
    rpc::Type::GetVolumeStats,
    rpc::Type::VolumeCondition,
    rpc::Type::ExpandVolume,
    rpc::Type::SingleNodeMultiWriter,
];

/// volume_context key the kubelet sets on CSI ephemeral inline volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// Pod information the kubelet adds (podInfoOnMount); kept as the volume's context.
pub const POD_INFO_KEYS: [&str; 4] = [
    "csi.storage.k8s.io/pod.name",
    "csi.storage.k8s.io/pod.namespace",
    "csi.storage.k8s.io/pod.uid",
    "csi.storage.k8s.io/serviceAccount.name",
];
const K8S_PREFIX: &str = "csi.storage.k8s.io/";
/// The inline volume attribute giving its size.
pub const SIZE_KEY: &str = "size";

/// An ext4 filesystem this much smaller than its device is grown.
const GROW_SLACK: u64 = 1 << 20;
/// Mounts stacked on one path that an unpublish/unstage peels off at most.
const MAX_STACKED: usize = 8;

#[derive(Debug, Clone)]
pub struct NodeService {
    driver: Arc<Driver>,
    /// Every staging and publish path lies beneath it.
    root: KubeletRoot,
    host: Arc<dyn Host>,
}

/// Node start-up work after the allocator's reconciliation: record (or
/// report) mounts of our devices that an interrupted call left without a
/// publication record, then delete ephemeral inline volumes whose pods are
/// gone (their target is no longer mounted).
pub async fn startup(driver: &Arc<Driver>) {
    let host = RealHost::new();
    let scan = scan_mounts(driver, &host, false).await;
    let collected = collect_ephemeral(driver, &host, false).await;
    tracing::info!(
        recorded_mounts = scan.recorded.len(),
        unrecorded_mounts = scan.unrecorded.len(),
        ephemeral_deleted = collected.deleted.len(),
        ephemeral_pending = collected.pending.len(),
        "node start-up reconciliation done"
    );
    if !collected.pending.is_empty() {
        driver.node_reconcile.kick();
    }
}

fn failed(msg: impl Into<String>) -> AgentError {
    AgentError::FailedPrecondition(msg.into())
}

fn not_found(msg: impl Into<String>) -> AgentError {
    AgentError::NotFound(msg.into())
}

fn exists(msg: impl Into<String>) -> AgentError {
    AgentError::AlreadyExists(msg.into())
}

/// A required id of the request: present and of bounded length.
fn require(field: &str, value: &str) -> AgentResult<()> {
    check_id(field, value)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The top mount at `path` (later entries are stacked on earlier ones).
fn top_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// A ledger path as the OS sees it (symlinks of ancestors resolved).
fn resolved(p: &str) -> PathBuf {
    paths::resolve(Path::new(p)).unwrap_or_else(|_| PathBuf::from(p))
}

fn path_error(e: PathError) -> AgentError {
    match e {
        PathError::Invalid(m) => AgentError::InvalidArgument(m),
        PathError::Precondition(m) => AgentError::FailedPrecondition(m),
    }
}

/// A confined path for a message (bounded).
fn shown(p: &Confined) -> String {
    quote(&p.lexical().to_string_lossy())
}

fn cap_flags(cap: &Capability) -> &[String] {
    match &cap.access {
        Access::Mount { flags, .. } => flags,
        Access::Block => &[],
    }
}

/// A failed mount(2): EINVAL with client mount_flags is their mistake.
fn mount_failed(e: MountError, flags: &[String]) -> AgentError {
    let client = flags
        .iter()
        .flat_map(|f| f.split(','))
        .any(|o| !o.is_empty() && o != "defaults");
    if client && e.errno() == Some(nix::errno::Errno::EINVAL) {
        return invalid(format!(
            "volume_capability.mount.mount_flags {} were rejected by the kernel (EINVAL)",
            quote(&flags.join(","))
        ));
    }
    e.into()
}

fn is_block(p: &Publication) -> bool {
    p.capability.starts_with("block;")
}

fn ready(v: &Volume) -> AgentResult<()> {
    if v.state == VolumeState::Ready {
        Ok(())
    } else {
        Err(not_found(format!(
            "volume {} is {}, not ready",
            v.id, v.state
        )))
    }
}

/// The block device of a volume.
fn device_of(v: &Volume) -> AgentResult<PathBuf> {
    v.device.as_deref().map(PathBuf::from).ok_or_else(|| {
        failed(format!(
            "volume {} has no block device: the backend runs without devices (sim file-only mode, no access to /dev/loop-control), so its volumes cannot be staged or published on this node",
            v.id
        ))
    })
}

/// A validated capability plus whether fs_type was given (an empty fs_type
/// adopts whichever supported filesystem the device already has).
fn capability(c: Option<&csi::VolumeCapability>) -> AgentResult<(Capability, bool)> {
    let c = c.ok_or_else(|| invalid("volume_capability is required"))?;
    let cap = parse_capability("volume_capability", c)?;
    let explicit = match &c.access_type {
        Some(AccessType::Mount(m)) => {
            if !m.volume_mount_group.is_empty() {
                return Err(invalid(format!(
                    "volume_capability.mount.volume_mount_group {} is not supported (no VOLUME_MOUNT_GROUP capability)",
                    crate::error::quote(&m.volume_mount_group)
                )));
            }
            !m.fs_type.is_empty()
        }
        _ => true,
    };
    if let Access::Mount { flags, .. } = &cap.access {
        parse_options(flags)
            .map_err(|e| invalid(format!("volume_capability.mount.mount_flags: {e}")))?;
    }
    Ok((cap, explicit))
}

fn is_ephemeral(ctx: &HashMap<String, String>) -> AgentResult<bool> {
    match ctx.get(EPHEMERAL_KEY).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(invalid(format!(
            "volume_context {EPHEMERAL_KEY}={} must be true or false",
            crate::error::quote(other)
        ))),
    }
}

/// The create request of a CSI ephemeral inline volume: named after the
/// kubelet's volume id, sized by the `size` attribute, with `usage` and
/// `eraseAfter` as in a StorageClass and the pod information as context.
pub fn ephemeral_request(
    name: &str,
    ctx: &HashMap<String, String>,
    fs: FsType,
) -> AgentResult<CreateRequest> {
    check_map("volume_context", ctx)?;
    let raw = ctx.get(SIZE_KEY).ok_or_else(|| {
        invalid(format!(
            "volume_context attribute {SIZE_KEY:?} is required for a CSI ephemeral inline volume (a quantity such as 2Gi)"
        ))
    })?;
    // A quantity is short; parse_size's messages echo it whole.
    crate::csi::params::check_len(&format!("volume_context attribute {SIZE_KEY}"), raw, 64)?;
    let size = parse_size(raw).map_err(|e| {
        invalid(format!(
            "volume_context attribute {SIZE_KEY}={}: {e}",
            crate::error::quote(raw)
        ))
    })?;
    if size.0 == 0 {
        return Err(invalid(format!(
            "volume_context attribute {SIZE_KEY}={} must be above zero",
            crate::error::quote(raw)
        )));
    }
    // As CreateVolume does: round up to what the filesystem needs (an
    // inline volume has no limit_bytes).
    let size = Bytes(size.0.max(fs.min_bytes()));
    let attrs: HashMap<String, String> = ctx
        .iter()
        .filter(|(k, _)| k.as_str() != SIZE_KEY && !k.starts_with(K8S_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let p = parse_parameters_with(&attrs, &[SIZE_KEY])
        .map_err(|e| invalid(format!("volume_context of an ephemeral inline volume: {e}")))?;
    let context: BTreeMap<String, String> = ctx
        .iter()
        .filter(|(k, _)| POD_INFO_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(CreateRequest {
        name: name.to_owned(),
        required: size,
        limit: None,
        usage: p.usage,
        erase_after: p.erase_after,
        parameters: p.stored,
        persistency: Persistency::Ephemeral,
        context,
        region: None,
    })
}

/// A filesystem mount of a volume's device at a path.
#[derive(Debug)]
struct FsMount<'a> {
    v: &'a Volume,
    dev: &'a Path,
    rdev: u64,
    fs: FsType,
    explicit: bool,
    flags: &'a [String],
    target: &'a Confined,
    read_only: bool,
}

/// Text of the condition when AppDirect could not get DAX.
fn no_dax(dev: &Path) -> String {
    format!(
        "AppDirect requested but device {} has no DAX; mounted without dax",
        dev.display()
    )
}

impl NodeService {
    pub fn new(driver: Arc<Driver>) -> NodeService {
        NodeService::with_host(driver, Arc::new(RealHost::new()))
    }

    /// A node service on another host implementation (tests).
    pub fn with_host(driver: Arc<Driver>, host: Arc<dyn Host>) -> NodeService {
        NodeService {
            root: KubeletRoot::new(driver.cfg.kubelet_root.clone()),
            driver,
            host,
        }
    }

    /// Claims `id` for this call with the driver's per-volume lock (shared
    /// with the controller), or ABORTED when another call holds it.
    fn begin(&self, id: &str) -> AgentResult<VolumeGuard> {
        self.driver.lock_volume(id)
    }

    /// A request path confined beneath the kubelet root.
    fn confine(&self, field: &'static str, raw: &str) -> AgentResult<Confined> {
        self.root.check(field, raw).map_err(path_error)
    }

    async fn volume(&self, id: &str) -> AgentResult<Option<Volume>> {
        let id = id.to_owned();
        blocking(&self.driver.alloc, move |a| a.volume(&id)).await
    }

    /// By id, or for an ephemeral inline volume by the kubelet's id, which
    /// is its name. A deleted volume whose extent is still being erased
    /// does not exist any more.
    async fn volume_or_ephemeral(&self, id: &str) -> AgentResult<Option<Volume>> {
        let id = id.to_owned();
        blocking(&self.driver.alloc, move |a| {
            let v = match a.volume(&id)? {
                Some(v) => Some(v),
                None => a
                    .volume_by_name(&id)?
                    .filter(|v| v.persistency == Persistency::Ephemeral),
            };
            Ok(v.filter(|v| v.state != VolumeState::Erasing))
        })
        .await
    }

    async fn publications(&self, volume_id: &str) -> AgentResult<Vec<Publication>> {
        let id = volume_id.to_owned();
        blocking(&self.driver.alloc, move |a| a.publications(Some(&id))).await
    }

    async fn record(&self, p: Publication) -> AgentResult<()> {
        blocking(&self.driver.alloc, move |a| a.put_publication(&p)).await
    }

    async fn unrecord(
        &self,
        volume_id: &str,
        kind: PublicationKind,
        path: &str,
    ) -> AgentResult<()> {
        let (id, path) = (volume_id.to_owned(), path.to_owned());
        blocking(&self.driver.alloc, move |a| {
            a.delete_publication(&id, kind, &path)
        })
        .await
    }

    /// `st_rdev` of the volume's device; FAILED_PRECONDITION when it is gone.
    async fn rdev(&self, v: &Volume, dev: &Path) -> AgentResult<u64> {
        self.host.device_number(dev).await?.ok_or_else(|| {
            failed(format!(
                "device {} of volume {} is missing",
                dev.display(),
                v.id
            ))
        })
    }

    /// Makes sure the device carries the wanted filesystem: formats an empty
    /// device, never one with anything else on it, and grows an ext4 that is
    /// smaller than its device (offline growth: online needs privileges many
    /// nodes lack). Returns the filesystem to mount.
    async fn prepare_fs(&self, m: &FsMount<'_>) -> AgentResult<FsType> {
        let found = match self.host.probe(m.dev).await? {
            Probe::Empty => None,
            Probe::Filesystem(t) => Some(t),
            Probe::Other(what) => {
                return Err(failed(format!(
                    "device {} of volume {} holds {what}; refusing to format it",
                    m.dev.display(),
                    m.v.id
                )));
            }
        };
        let fs = match found.as_deref() {
            None => {
                let size = self.host.device_size(m.dev).await?;
                if m.fs == FsType::Xfs && size < XFS_MIN_BYTES {
                    return Err(failed(format!(
                        "volume {} is {} but an xfs filesystem needs at least {}; use a larger volume or fs_type ext4",
                        m.v.id,
                        Bytes(size),
                        Bytes(XFS_MIN_BYTES)
                    )));
                }
                tracing::info!(volume = %m.v.id, device = %m.dev.display(), fs = m.fs.as_str(), "formatting");
                self.host.mkfs(m.dev, m.fs).await?;
                return Ok(m.fs);
            }
            Some(t) if t == m.fs.as_str() => m.fs,
            Some("xfs") if !m.explicit => FsType::Xfs,
            Some("ext4") if !m.explicit => FsType::Ext4,
            Some(t) => {
                return Err(failed(format!(
                    "device {} of volume {} already has a {t} filesystem but volume_capability asks for {}; refusing to reformat it",
                    m.dev.display(),
                    m.v.id,
                    m.fs.as_str()
                )));
            }
        };
        if fs == FsType::Ext4 {
            self.grow_ext4_offline(m.v, m.dev).await?;
        }
        Ok(fs)
    }

    /// Grows an unmounted ext4 filesystem to its device when it is smaller.
    async fn grow_ext4_offline(&self, v: &Volume, dev: &Path) -> AgentResult<()> {
        let size = self.host.device_size(dev).await?;
        let fs_size = self.host.ext4_size(dev).await?;
        if fs_size.saturating_add(GROW_SLACK) <= size {
            tracing::info!(volume = %v.id, device = %dev.display(), from = fs_size, to = size, "growing ext4 filesystem offline");
            self.host.grow_offline_ext4(dev).await?;
        }
        Ok(())
    }

    /// Formats if needed and mounts the device at the target, with `dax`
    /// for AppDirect volumes when the device supports it; finishes a mount
    /// an interrupted call left behind.
    async fn mount_fs(&self, m: FsMount<'_>) -> AgentResult<()> {
        let opts = parse_options(m.flags)
            .map_err(|e| invalid(format!("volume_capability.mount.mount_flags: {e}")))?;
        let want_dax = m.v.usage == Usage::AppDirect;
        let dax = want_dax && self.host.dax_supported(m.dev).await;
        let existing = match self.host.inspect(m.target).await? {
            Some(PathState { mount: Some(e), .. }) if e.dev != m.rdev => {
                return Err(failed(format!(
                    "{} {} already has a mount of another device ({} from {}); refusing to mount volume {} over it",
                    m.target.field(),
                    shown(m.target),
                    e.fs_type,
                    quote(&e.source),
                    m.v.id
                )));
            }
            Some(PathState { mount: Some(e), .. }) => Some(e),
            Some(s) if !s.is_dir() => {
                return Err(m.target.wrong_type("a directory", s.kind).into());
            }
            _ => None,
        };
        if let Some(e) = existing {
            // Mounted by an earlier (perhaps interrupted) call, and perhaps
            // in use: report a missing dax, do not undo.
            if dax && !e.dax() {
                tracing::warn!(volume = %m.v.id, target = %m.target.real().display(), options = %e.super_options.join(","), "AppDirect volume is mounted without dax");
            }
            if e.fs_type == "xfs" && !e.read_only() {
                self.host.set_extent_hint(m.target).await?;
            }
            return Ok(());
        }
        let fs = self.prepare_fs(&m).await?;
        self.host.make_dir(m.target).await?;
        let mut flags = opts.flags;
        if m.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let mut data = opts.data.clone();
        if dax {
            data.push("dax".into());
        } else if want_dax {
            tracing::warn!(volume = %m.v.id, device = %m.dev.display(), "{}", no_dax(m.dev));
        }
        // Every check of the new mount happens inside the host call, which
        // undoes the mount when one fails: a failed call leaves nothing.
        self.host
            .mount(&MountSpec {
                source: m.dev.to_owned(),
                device: m.rdev,
                target: m.target.clone(),
                fs_type: fs.as_str().to_owned(),
                flags,
                data,
                dax_required: dax,
                extent_hint: fs == FsType::Xfs,
            })
            .await
            .map_err(|e| match e {
                MountError::NoDax(opts) => failed(format!(
                    "mounted volume {} with dax but the kernel did not enable DAX (options {opts}); unmounted it",
                    m.v.id
                )),
                e => mount_failed(e, m.flags),
            })?;
        tracing::info!(volume = %m.v.id, device = %m.dev.display(), target = %m.target.real().display(), fs = fs.as_str(), dax, "mounted");
        Ok(())
    }

    /// The device a recorded stage/publish mounted: as recorded, or for
    /// rows from before it was recorded the volume's device now.
    async fn recorded_device(&self, p: &Publication, v: &Volume) -> AgentResult<Option<u64>> {
        if p.device.is_some() {
            return Ok(p.device);
        }
        match &v.device {
            Some(d) => Ok(self.host.device_number(Path::new(d)).await?),
            None => Ok(None),
        }
    }

    /// Unmounts the mounts of `device` at `path` (a recorded stage or
    /// publish path of `v`). A mount of anything else, or any mount when no
    /// device is known, is FAILED_PRECONDITION and stays.
    async fn release(&self, v: &Volume, path: &Confined, device: Option<u64>) -> AgentResult<()> {
        let mut peeled = 0;
        loop {
            let Some(PathState { mount: Some(e), .. }) = self.host.inspect(path).await? else {
                return Ok(());
            };
            let Some(dev) = device else {
                return Err(failed(format!(
                    "{} {} has a mount ({} from {}) but no device of volume {} is known (it has no block device, or is not ready); refusing to unmount it",
                    path.field(),
                    shown(path),
                    e.fs_type,
                    quote(&e.source),
                    v.id
                )));
            };
            if peeled == MAX_STACKED {
                return Err(AgentError::Internal(format!(
                    "{} is still mounted after {MAX_STACKED} unmounts",
                    path.real().display()
                )));
            }
            match self.host.unmount(path, dev).await? {
                Unmounted::Done => {
                    tracing::info!(volume = %v.id, path = %path.real().display(), "unmounted");
                    peeled += 1;
                }
                Unmounted::NotMounted => return Ok(()),
                Unmounted::Foreign(e) => {
                    return Err(failed(format!(
                        "{} {} is a mount of another device ({} from {}), not of volume {}; refusing to unmount it",
                        path.field(),
                        shown(path),
                        e.fs_type,
                        quote(&e.source),
                        v.id
                    )));
                }
            }
        }
    }

    async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> AgentResult<csi::NodeStageVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let staging = self.confine("staging_target_path", &req.staging_target_path)?;
        let (cap, explicit) = capability(req.volume_capability.as_ref())?;
        let _busy = self.begin(&req.volume_id)?;
        let v = self
            .volume(&req.volume_id)
            .await?
            .ok_or_else(|| not_found(format!("volume {} does not exist", req.volume_id)))?;
        ready(&v)?;
        let dev = device_of(&v)?;
        let desc = cap.describe();
        let pubs = self.publications(&v.id).await?;
        if let Some(p) = pubs.iter().find(|p| p.kind == PublicationKind::Stage) {
            if !staging.same_as(&p.path) {
                return Err(exists(format!(
                    "volume {} is already staged at {}; unstage it before staging it at {}",
                    v.id,
                    quote(&p.path),
                    shown(&staging)
                )));
            }
            if !same_capability(p, &desc) {
                return Err(exists(format!(
                    "volume {} is already staged at {} as {} but this call asks for {desc}",
                    v.id,
                    quote(&p.path),
                    p.capability
                )));
            }
        }
        if let Some(p) = pubs
            .iter()
            .find(|p| p.kind == PublicationKind::Publish && staging.same_as(&p.path))
        {
            return Err(invalid(format!(
                "staging_target_path {} is where volume {} is published; the two paths must differ",
                quote(&p.path),
                v.id
            )));
        }
        let rdev = self.rdev(&v, &dev).await?;
        if let Access::Mount { fs, flags } = &cap.access {
            self.mount_fs(FsMount {
                v: &v,
                dev: &dev,
                rdev,
                fs: *fs,
                explicit,
                flags,
                target: &staging,
                read_only: false,
            })
            .await?;
        }
        self.record(Publication {
            volume_id: v.id.clone(),
            kind: PublicationKind::Stage,
            path: req.staging_target_path.clone(),
            readonly: false,
            capability: desc,
            device: Some(rdev),
        })
        .await?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> AgentResult<csi::NodeUnstageVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let staging = self.confine("staging_target_path", &req.staging_target_path)?;
        let _busy = self.begin(&req.volume_id)?;
        let Some(v) = self.volume(&req.volume_id).await? else {
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        let pubs = self.publications(&v.id).await?;
        let Some(stage) = pubs
            .iter()
            .find(|p| p.kind == PublicationKind::Stage && staging.same_as(&p.path))
        else {
            // Not staged there by us: nothing of ours to undo.
            tracing::info!(volume = %v.id, path = %staging.real().display(), "no stage of the volume is recorded at this path; nothing to do");
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        let mut live = Vec::new();
        // Read once, and only if a row from before confinement needs it.
        let mut table: Option<Vec<MountEntry>> = None;
        for p in pubs.iter().filter(|p| p.kind == PublicationKind::Publish) {
            let dev = self.recorded_device(p, &v).await?;
            let mounted = match self.root.check("target_path", &p.path) {
                Ok(c) => match self.host.inspect(&c).await {
                    Ok(Some(s)) => s.mount.is_some() && dev.is_none_or(|d| s.shows(d)),
                    Ok(None) => false,
                    // Unreadable now (e.g. an ancestor became a symlink): keep it.
                    Err(_) => true,
                },
                // A row from before confinement (outside the root): judged
                // from the mount table only, never touched.
                Err(_) => {
                    if table.is_none() {
                        table = Some(self.host.mounts().await?);
                    }
                    let mounts = table.as_deref().unwrap_or_default();
                    top_mount(mounts, &resolved(&p.path))
                        .is_some_and(|e| dev.is_none_or(|d| e.dev == d))
                }
            };
            if mounted {
                live.push(quote(&p.path));
            } else {
                tracing::warn!(volume = %v.id, target = %p.path, "publication is no longer mounted; forgetting it");
                self.unrecord(&v.id, PublicationKind::Publish, &p.path)
                    .await?;
            }
        }
        if !live.is_empty() {
            return Err(failed(format!(
                "volume {} is still published at {}; unpublish it first",
                v.id,
                live.join(", ")
            )));
        }
        let dev = self.recorded_device(stage, &v).await?;
        // The staging directory belongs to the CO: unmounted, never removed.
        self.release(&v, &staging, dev).await?;
        self.unrecord(&v.id, PublicationKind::Stage, &stage.path)
            .await?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> AgentResult<csi::NodePublishVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let target = self.confine("target_path", &req.target_path)?;
        let (cap, explicit) = capability(req.volume_capability.as_ref())?;
        if is_ephemeral(&req.volume_context)? {
            return self.publish_ephemeral(&req, &cap, explicit, &target).await;
        }
        if req.staging_target_path.is_empty() {
            return Err(invalid(
                "staging_target_path is required: pmem-agent stages volumes (STAGE_UNSTAGE_VOLUME)",
            ));
        }
        let staging = self.confine("staging_target_path", &req.staging_target_path)?;
        if staging.real() == target.real() {
            return Err(invalid(format!(
                "target_path {} is the staging_target_path; the two paths must differ",
                shown(&target)
            )));
        }
        let _busy = self.begin(&req.volume_id)?;
        let v = self
            .volume(&req.volume_id)
            .await?
            .ok_or_else(|| not_found(format!("volume {} does not exist", req.volume_id)))?;
        ready(&v)?;
        let dev = device_of(&v)?;
        let pubs = self.publications(&v.id).await?;
        let stage = pubs
            .iter()
            .find(|p| p.kind == PublicationKind::Stage)
            .ok_or_else(|| {
                failed(format!(
                    "volume {} is not staged; call NodeStageVolume first",
                    v.id
                ))
            })?;
        if !staging.same_as(&stage.path) {
            return Err(failed(format!(
                "volume {} is staged at {}, not at {}",
                v.id,
                quote(&stage.path),
                shown(&staging)
            )));
        }
        let block = cap.access == Access::Block;
        if is_block(stage) != block {
            let kind = |b: bool| if b { "block" } else { "mount" };
            return Err(failed(format!(
                "volume {} was staged for {} access but volume_capability asks for {} access",
                v.id,
                kind(is_block(stage)),
                kind(block)
            )));
        }
        let readonly = req.readonly || cap.read_only();
        let desc = cap.describe();
        if let Some(p) = pubs
            .iter()
            .find(|p| p.kind == PublicationKind::Publish && target.same_as(&p.path))
            && (!same_capability(p, &desc) || p.readonly != readonly)
        {
            return Err(exists(format!(
                "volume {} is already published at {} as {} readonly={} but this call asks for {desc} readonly={readonly}",
                v.id,
                quote(&p.path),
                p.capability,
                p.readonly
            )));
        }
        let single = Mode::SingleNodeSingleWriter.as_str_name();
        let others: Vec<&Publication> = pubs
            .iter()
            .filter(|p| p.kind == PublicationKind::Publish && !target.same_as(&p.path))
            .collect();
        if !others.is_empty()
            && (cap.mode == Mode::SingleNodeSingleWriter
                || others.iter().any(|p| p.capability.ends_with(single)))
        {
            return Err(failed(format!(
                "volume {} is used with {single} and is already published at {}",
                v.id,
                others
                    .iter()
                    .map(|p| quote(&p.path))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let rdev = self.rdev(&v, &dev).await?;
        let mut flags = match &cap.access {
            Access::Mount { flags, .. } => parse_options(flags)
                .map_err(|e| invalid(format!("volume_capability.mount.mount_flags: {e}")))?
                .per_mount(),
            Access::Block => MsFlags::empty(),
        };
        if readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        let (source, source_ro) = if block {
            (BindSource::Device(dev.clone()), false)
        } else {
            match self.host.inspect(&staging).await? {
                Some(PathState { mount: Some(e), .. }) if e.dev == rdev => {
                    (BindSource::Staging(staging.clone()), e.read_only())
                }
                _ => {
                    return Err(failed(format!(
                        "volume {} is recorded as staged at {} but it is not mounted there; stage it again",
                        v.id,
                        shown(&staging)
                    )));
                }
            }
        };
        match self.host.inspect(&target).await? {
            Some(s) if s.mount.is_some() => {
                let e = s.mount.as_ref().expect("checked");
                if !s.shows(rdev) {
                    return Err(failed(format!(
                        "target_path {} already has a mount of another device ({} from {}); refusing to publish volume {} there",
                        shown(&target),
                        e.fs_type,
                        quote(&e.source),
                        v.id
                    )));
                }
                let ro_now = e.mount_options.iter().any(|o| o == "ro");
                if ro_now != readonly && !(ro_now && source_ro) {
                    return Err(exists(format!(
                        "volume {} is already mounted at {} with read-only={ro_now} but this call asks for read-only={readonly}",
                        v.id,
                        shown(&target)
                    )));
                }
            }
            Some(s) if block && s.kind != libc::S_IFREG => {
                return Err(target.wrong_type("a regular file", s.kind).into());
            }
            Some(s) if !block && !s.is_dir() => {
                return Err(target.wrong_type("a directory", s.kind).into());
            }
            _ => {
                if block {
                    self.host.make_file(&target).await?;
                } else {
                    self.host.make_dir(&target).await?;
                }
                self.host
                    .bind(&source, &target, rdev, flags)
                    .await
                    .map_err(|e| mount_failed(e, cap_flags(&cap)))?;
                tracing::info!(volume = %v.id, target = %target.real().display(), readonly, "published");
            }
        }
        self.record(Publication {
            volume_id: v.id.clone(),
            kind: PublicationKind::Publish,
            path: req.target_path.clone(),
            readonly,
            capability: desc,
            device: Some(rdev),
        })
        .await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    /// A CSI ephemeral inline volume: created on first publish (named after
    /// the kubelet's volume id), formatted and mounted at the target.
    async fn publish_ephemeral(
        &self,
        req: &csi::NodePublishVolumeRequest,
        cap: &Capability,
        explicit: bool,
        target: &Confined,
    ) -> AgentResult<csi::NodePublishVolumeResponse> {
        let Access::Mount { fs, .. } = &cap.access else {
            return Err(invalid(
                "volume_capability must be a mount for a CSI ephemeral inline volume (block is not supported)",
            ));
        };
        let creq = ephemeral_request(&req.volume_id, &req.volume_context, *fs)?;
        let _busy = self.begin(&req.volume_id)?;
        let v = blocking(&self.driver.alloc, move |a| a.create_volume(&creq)).await?;
        match self.finish_ephemeral(req, cap, explicit, target, &v).await {
            Ok(()) => Ok(csi::NodePublishVolumeResponse {}),
            Err(e) => {
                self.discard_unused_ephemeral(&v, target).await;
                Err(e)
            }
        }
    }

    async fn finish_ephemeral(
        &self,
        req: &csi::NodePublishVolumeRequest,
        cap: &Capability,
        explicit: bool,
        target: &Confined,
        v: &Volume,
    ) -> AgentResult<()> {
        let Access::Mount { fs, flags } = &cap.access else {
            return Err(invalid("volume_capability must be a mount"));
        };
        ready(v)?;
        let dev = device_of(v)?;
        let readonly = req.readonly || cap.read_only();
        let desc = cap.describe();
        let pubs = self.publications(&v.id).await?;
        if let Some(p) = pubs.iter().find(|p| p.kind == PublicationKind::Publish) {
            if !target.same_as(&p.path) {
                return Err(exists(format!(
                    "ephemeral volume {} ({}) is already published at {}",
                    quote(&v.name),
                    v.id,
                    quote(&p.path)
                )));
            }
            if !same_capability(p, &desc) || p.readonly != readonly {
                return Err(exists(format!(
                    "ephemeral volume {} ({}) is already published at {} as {} readonly={} but this call asks for {desc} readonly={readonly}",
                    quote(&v.name),
                    v.id,
                    quote(&p.path),
                    p.capability,
                    p.readonly
                )));
            }
        }
        let rdev = self.rdev(v, &dev).await?;
        self.mount_fs(FsMount {
            v,
            dev: &dev,
            rdev,
            fs: *fs,
            explicit,
            flags,
            target,
            read_only: readonly,
        })
        .await?;
        self.record(Publication {
            volume_id: v.id.clone(),
            kind: PublicationKind::Publish,
            path: req.target_path.clone(),
            readonly,
            capability: desc,
            device: Some(rdev),
        })
        .await
    }

    /// After a failed ephemeral publish: a volume nobody uses must not leak.
    async fn discard_unused_ephemeral(&self, v: &Volume, target: &Confined) {
        match self.publications(&v.id).await {
            Ok(p) if p.is_empty() => {}
            _ => return,
        }
        let dev = match &v.device {
            Some(d) => self.host.device_number(Path::new(d)).await.ok().flatten(),
            None => None,
        };
        if let Err(e) = self.release(v, target, dev).await {
            tracing::warn!(volume = %v.id, error = %e, "cannot unmount the target of a failed ephemeral publish; start-up will collect the volume");
            return;
        }
        let id = v.id.clone();
        match blocking(&self.driver.alloc, move |a| a.delete_volume(&id)).await {
            Ok(()) => {
                tracing::info!(volume = %v.id, name = %v.name, "deleted ephemeral volume of a failed publish")
            }
            Err(e) => {
                tracing::warn!(volume = %v.id, error = %e, "cannot delete ephemeral volume of a failed publish; start-up will collect it")
            }
        }
    }

    /// Undoes exactly the publication the ledger records for this volume at
    /// this path: unmounts it (only a mount of the recorded device) and
    /// removes the target it created. Anything else at the path, or a path
    /// without a record, is left alone.
    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> AgentResult<csi::NodeUnpublishVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let target = self.confine("target_path", &req.target_path)?;
        let _busy = self.begin(&req.volume_id)?;
        let Some(v) = self.volume_or_ephemeral(&req.volume_id).await? else {
            return Ok(csi::NodeUnpublishVolumeResponse {});
        };
        let pubs = self.publications(&v.id).await?;
        let Some(p) = pubs
            .iter()
            .find(|p| p.kind == PublicationKind::Publish && target.same_as(&p.path))
        else {
            tracing::info!(volume = %v.id, target = %target.real().display(), "no publication of the volume is recorded at this path; nothing to do");
            return Ok(csi::NodeUnpublishVolumeResponse {});
        };
        let dev = self.recorded_device(p, &v).await?;
        self.release(&v, &target, dev).await?;
        let leaf = if is_block(p) { Leaf::File } else { Leaf::Dir };
        match self.host.remove(&target, leaf).await? {
            Removed::Yes | Removed::Absent => {}
            // Unmounted, so no longer published; what is left is not ours.
            Removed::Kept(why) => {
                tracing::warn!(volume = %v.id, target = %target.real().display(), reason = %why, "unpublished; the target stays")
            }
        }
        self.unrecord(&v.id, PublicationKind::Publish, &p.path)
            .await?;
        if v.persistency == Persistency::Ephemeral {
            self.delete_unused_ephemeral(&v, &req.volume_id).await?;
        }
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    /// After an ephemeral unpublish (the lock of `held`, the key the call
    /// used, taken): deletes the volume when no publication is left, under
    /// its other key too. When that fails (device still in use) the
    /// collector retries it.
    async fn delete_unused_ephemeral(&self, v: &Volume, held: &str) -> AgentResult<()> {
        if !self.publications(&v.id).await?.is_empty() {
            return Ok(());
        }
        let other = if held == v.id { &v.name } else { &v.id };
        let _other = self.driver.lock_volume(other)?;
        let id = v.id.clone();
        blocking(&self.driver.alloc, move |a| a.delete_volume(&id)).await?;
        tracing::info!(volume = %v.id, name = %v.name, "deleted ephemeral inline volume");
        Ok(())
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> AgentResult<csi::NodeGetVolumeStatsResponse> {
        // Both fields present first (a missing one is the client's mistake
        // whatever the volume), then the volume: an unknown volume is
        // NOT_FOUND whatever the path.
        require("volume_id", &req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(invalid("volume_path is required"));
        }
        let v = self
            .volume_or_ephemeral(&req.volume_id)
            .await?
            .ok_or_else(|| not_found(format!("volume {} does not exist", req.volume_id)))?;
        // A relative path is nowhere a volume can be mounted: the spec's
        // NOT_FOUND for a volume that is not at volume_path. Absolute paths
        // outside the root or through symlinks stay InvalidArgument.
        if !req.volume_path.starts_with('/') {
            return Err(not_found(format!(
                "volume {} is not at volume_path {}: not an absolute path",
                v.id,
                quote(&req.volume_path)
            )));
        }
        let path = self.confine("volume_path", &req.volume_path)?;
        let pubs = self.publications(&v.id).await?;
        let record = pubs.iter().find(|p| path.same_as(&p.path));
        let dev = v.device.as_deref().map(PathBuf::from);
        let rdev = match &dev {
            Some(d) => self.host.device_number(d).await?,
            None => None,
        };
        // What is at the path, from a descriptor opened beneath the root
        // (its mount by the mount id of that descriptor, never by name).
        let state = self.host.inspect(&path).await?;
        let entry = state.as_ref().and_then(|s| s.mount.as_ref());
        let ours = match (&state, rdev) {
            (Some(s), Some(r)) => s.shows(r),
            _ => false,
        };
        if !ours && record.is_none() {
            return Err(not_found(format!(
                "volume_path {} is not a staging or publish path of volume {}",
                shown(&path),
                v.id
            )));
        }
        let block = match record {
            Some(p) => is_block(p),
            None => state.as_ref().is_some_and(|s| s.kind == libc::S_IFBLK),
        };
        let dev_name = dev
            .as_ref()
            .map_or_else(|| "(none)".to_owned(), |d| d.display().to_string());
        let mut usage = Vec::new();
        let mut problems = Vec::new();
        if rdev.is_none() {
            problems.push(format!("device {dev_name} of volume {} is missing", v.id));
        }
        let fs_mount = match (ours, entry, rdev) {
            (true, Some(e), Some(r)) if e.dev == r => Some((e, r)),
            _ => None,
        };
        if block {
            if let (Some(d), Some(_)) = (&dev, rdev) {
                usage.push(csi::VolumeUsage {
                    available: 0,
                    total: to_i64(self.host.device_size(d).await?),
                    used: 0,
                    unit: Unit::Bytes as i32,
                });
            }
            let staged_only = record.is_some_and(|p| p.kind == PublicationKind::Stage);
            if !ours && !staged_only && rdev.is_some() {
                problems.push(format!(
                    "device of volume {} is not mounted at {}",
                    v.id,
                    shown(&path)
                ));
            }
        } else if let Some((e, r)) = fs_mount {
            // Through a descriptor of the mount's root, checked again there.
            let s = self.host.statvfs(&path, r).await?;
            let bs = s.block_size;
            usage.push(csi::VolumeUsage {
                available: to_i64(s.blocks_avail.saturating_mul(bs)),
                total: to_i64(s.blocks.saturating_mul(bs)),
                used: to_i64(s.blocks.saturating_sub(s.blocks_free).saturating_mul(bs)),
                unit: Unit::Bytes as i32,
            });
            usage.push(csi::VolumeUsage {
                available: to_i64(s.files_free),
                total: to_i64(s.files),
                used: to_i64(s.files.saturating_sub(s.files_free)),
                unit: Unit::Inodes as i32,
            });
            if v.usage == Usage::AppDirect && !e.dax() {
                let d = Path::new(&dev_name);
                problems.push(if self.host.dax_supported(d).await {
                    format!(
                        "AppDirect requested and device {dev_name} has DAX, but the filesystem is mounted without dax; unstage and stage it again"
                    )
                } else {
                    no_dax(d)
                });
            }
        } else if rdev.is_some() {
            problems.push(match entry {
                Some(e) => format!(
                    "{} has a mount of another device ({} from {}) instead of volume {}",
                    shown(&path),
                    e.fs_type,
                    quote(&e.source),
                    v.id
                ),
                None => format!(
                    "volume {} is not mounted at {} although it is recorded as {}d there",
                    v.id,
                    shown(&path),
                    record.map_or("publish", |p| p.kind.as_str())
                ),
            });
        }
        let condition = if problems.is_empty() {
            csi::VolumeCondition {
                abnormal: false,
                message: "volume is healthy".into(),
            }
        } else {
            csi::VolumeCondition {
                abnormal: true,
                message: problems.join("; "),
            }
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> AgentResult<csi::NodeExpandVolumeResponse> {
        require("volume_id", &req.volume_id)?;
        let (required, limit) = parse_range("capacity_range", req.capacity_range.as_ref())?;
        let cap = match &req.volume_capability {
            Some(c) => Some(capability(Some(c))?.0),
            None => None,
        };
        let _busy = self.begin(&req.volume_id)?;
        // The volume first: an unknown volume is NOT_FOUND whatever the path.
        let v = self
            .volume_or_ephemeral(&req.volume_id)
            .await?
            .ok_or_else(|| not_found(format!("volume {} does not exist", req.volume_id)))?;
        let path = self.confine("volume_path", &req.volume_path)?;
        let staging = if req.staging_target_path.is_empty() {
            None
        } else {
            Some(self.confine("staging_target_path", &req.staging_target_path)?)
        };
        ready(&v)?;
        let dev = device_of(&v)?;
        let rdev = self.rdev(&v, &dev).await?;
        let size = self.host.device_size(&dev).await?;
        if required.0 > size {
            return Err(AgentError::OutOfRange(format!(
                "capacity_range.required_bytes {} is above the {} of volume {}'s device; expand it with ControllerExpandVolume first",
                required.0,
                Bytes(size),
                v.id
            )));
        }
        if let Some(l) = limit
            && l.0 < size
        {
            return Err(AgentError::OutOfRange(format!(
                "capacity_range.limit_bytes {} is below the {} volume {}'s device already has",
                l.0,
                Bytes(size),
                v.id
            )));
        }
        let pubs = self.publications(&v.id).await?;
        let record = pubs.iter().find(|p| path.same_as(&p.path));
        let state = self.host.inspect(&path).await?;
        let ours = state.as_ref().is_some_and(|s| s.shows(rdev));
        if !ours && record.is_none() {
            return Err(not_found(format!(
                "volume_path {} is not a staging or publish path of volume {}",
                shown(&path),
                v.id
            )));
        }
        let block = cap.as_ref().is_some_and(|c| c.access == Access::Block)
            || record.is_some_and(is_block)
            || (ours && state.as_ref().is_some_and(|s| s.kind == libc::S_IFBLK));
        if block {
            return Ok(csi::NodeExpandVolumeResponse {
                capacity_bytes: to_i64(size),
            });
        }
        match self
            .writable_mount(&path, state.as_ref(), staging.as_ref(), &pubs, rdev)
            .await?
        {
            Some((mp, fs)) => self.grow_mounted(&v, &dev, &mp, &fs, size, rdev).await?,
            None => match self.host.probe(&dev).await? {
                Probe::Filesystem(t) if t == "ext4" => self.grow_ext4_offline(&v, &dev).await?,
                Probe::Filesystem(t) if t == "xfs" => {
                    return Err(failed(format!(
                        "volume {} is not mounted at {} and xfs grows only while mounted; stage it and retry",
                        v.id,
                        shown(&path)
                    )));
                }
                // Formatted to the full size when staged.
                Probe::Empty => {}
                Probe::Filesystem(t) | Probe::Other(t) => {
                    return Err(failed(format!(
                        "device {} of volume {} holds {t}, which pmem-agent cannot grow",
                        dev.display(),
                        v.id
                    )));
                }
            },
        }
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: to_i64(size),
        })
    }

    /// Where to grow the filesystem of device `rdev` while it is mounted:
    /// the request's staging path, else a recorded stage or read-write
    /// publish of the volume (a read-only mount cannot grow), else the
    /// request path itself; each a confined path judged through its
    /// descriptor, never a mount point looked up by name. With the
    /// filesystem type found there.
    async fn writable_mount(
        &self,
        path: &Confined,
        state: Option<&PathState>,
        staging: Option<&Confined>,
        pubs: &[Publication],
        rdev: u64,
    ) -> AgentResult<Option<(Confined, String)>> {
        let usable = |s: Option<PathState>| {
            s.and_then(|s| s.mount)
                .filter(|e| e.dev == rdev && !e.read_only())
                .map(|e| e.fs_type)
        };
        if let Some(s) = staging
            && let Some(fs) = usable(self.host.inspect(s).await?)
        {
            return Ok(Some((s.clone(), fs)));
        }
        let recorded = pubs
            .iter()
            .filter(|p| p.kind == PublicationKind::Stage)
            .chain(
                pubs.iter()
                    .filter(|p| p.kind == PublicationKind::Publish && !p.readonly),
            );
        for p in recorded {
            let field = match p.kind {
                PublicationKind::Stage => "staging_target_path",
                PublicationKind::Publish => "target_path",
            };
            // A row from before confinement (outside the root) is skipped.
            let Ok(c) = self.root.check(field, &p.path) else {
                continue;
            };
            // A recorded path that cannot be read now is no candidate.
            if let Ok(s) = self.host.inspect(&c).await
                && let Some(fs) = usable(s)
            {
                return Ok(Some((c, fs)));
            }
        }
        Ok(state
            .and_then(|s| s.mount.as_ref())
            .filter(|e| e.dev == rdev)
            .map(|e| (path.clone(), e.fs_type.clone())))
    }

    async fn grow_mounted(
        &self,
        v: &Volume,
        dev: &Path,
        mountpoint: &Confined,
        fs: &str,
        size: u64,
        rdev: u64,
    ) -> AgentResult<()> {
        match fs {
            "xfs" => {
                tracing::info!(volume = %v.id, mountpoint = %mountpoint.real().display(), "growing xfs filesystem");
                self.host
                    .grow_online(FsType::Xfs, mountpoint, rdev, size)
                    .await?;
            }
            "ext4" => {
                let fs_size = self.host.ext4_size(dev).await?;
                if fs_size.saturating_add(GROW_SLACK) <= size {
                    tracing::info!(volume = %v.id, mountpoint = %mountpoint.real().display(), "growing ext4 filesystem online");
                    self.host
                        .grow_online(FsType::Ext4, mountpoint, rdev, size)
                        .await
                        .map_err(|e| {
                            failed(format!(
                                "cannot grow the ext4 filesystem of volume {} online ({e}); unpublish and unstage the volume: NodeStageVolume grows ext4 offline before mounting it",
                                v.id
                            ))
                        })?;
                }
            }
            other => {
                return Err(failed(format!(
                    "volume {} is mounted at {} as {}, which pmem-agent cannot grow",
                    v.id,
                    shown(mountpoint),
                    quote(other)
                )));
            }
        }
        Ok(())
    }

    async fn info(&self) -> AgentResult<csi::NodeGetInfoResponse> {
        let d = &self.driver;
        // In memory (O(regions)); in place when the state is free.
        let max = match d
            .alloc
            .try_capacity_summary(pmem_allocator::Usage::AppDirect)
        {
            Some((_, max)) => max,
            None => blocking(&d.alloc, |a| a.max_volumes()).await?,
        };
        Ok(csi::NodeGetInfoResponse {
            node_id: d.cfg.node_id.clone(),
            max_volumes_per_node: to_i64(max),
            accessible_topology: Some(node_topology(&d.cfg.node_id)),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "NodeStageVolume", &id, async {
            check_path_lengths(&[("staging_target_path", &req.staging_target_path)])?;
            check_map("publish_context", &req.publish_context)?;
            check_map("volume_context", &req.volume_context)?;
            self.stage(req).await
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "NodeUnstageVolume", &id, async {
            check_path_lengths(&[("staging_target_path", &req.staging_target_path)])?;
            self.unstage(req).await
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "NodePublishVolume", &id, async {
            check_path_lengths(&[
                ("target_path", &req.target_path),
                ("staging_target_path", &req.staging_target_path),
            ])?;
            check_map("publish_context", &req.publish_context)?;
            check_map("volume_context", &req.volume_context)?;
            self.publish(req).await
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "NodeUnpublishVolume", &id, async {
            check_path_lengths(&[("target_path", &req.target_path)])?;
            let res = self.unpublish(req).await;
            if res.is_err() {
                // An inline volume whose unpublish failed is not retried by
                // every kubelet: let the collector look at it now.
                self.driver.node_reconcile.kick();
            }
            res
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        call(&self.driver.metrics, "NodeGetVolumeStats", &id, async {
            check_path_lengths(&[
                ("volume_path", &req.volume_path),
                ("staging_target_path", &req.staging_target_path),
            ])?;
            self.stats(req).await
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        let backend = self.driver.backend.clone();
        let can_expand = self.driver.can_expand;
        call(&self.driver.metrics, "NodeExpandVolume", &id, async move {
            if !can_expand {
                return Err(AgentError::Unimplemented(format!(
                    "NodeExpandVolume with the {backend} backend is not supported by pmem-agent"
                )));
            }
            check_path_lengths(&[
                ("volume_path", &req.volume_path),
                ("staging_target_path", &req.staging_target_path),
            ])?;
            self.expand(req).await
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        call(&self.driver.metrics, "NodeGetCapabilities", "", async {
            Ok(csi::NodeGetCapabilitiesResponse {
                capabilities: CAPABILITIES
                    .iter()
                    .filter(|t| self.driver.can_expand || **t != rpc::Type::ExpandVolume)
                    .map(|t| csi::NodeServiceCapability {
                        r#type: Some(node_service_capability::Type::Rpc(
                            node_service_capability::Rpc { r#type: *t as i32 },
                        )),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        call(&self.driver.metrics, "NodeGetInfo", "", self.info()).await
    }
}

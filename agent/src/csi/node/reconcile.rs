//! Node-level reconciliation: what the ledger's publications and the mount
//! table must agree on, beyond what the allocator's reconciliation sees.
//!
//! - The start-up mount scan finds mounts of our volumes' devices under the
//!   kubelet root that no publication records (a crash between mount and
//!   record) and records those that have the shape of a staging or publish
//!   path; the others are reported (log at warn, the admin Reconcile
//!   report, a metric). Nothing is ever unmounted here.
//! - The ephemeral collection deletes CSI ephemeral inline volumes that no
//!   live publication holds: at start, periodically, and right after a
//!   failed ephemeral unpublish, retrying a device still in use with
//!   backoff. Each volume is handled under its per-volume lock (id and
//!   name), so a publish in flight is never raced: it is skipped.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pmem_allocator::{Persistency, Publication, PublicationKind, Volume, VolumeState};

use super::{POD_INFO_KEYS, resolved, top_mount};
use crate::driver::Driver;
use crate::error::AgentError;
use crate::mount::paths;
use crate::mount::{Host, MountEntry};
use crate::rpc::blocking;

/// Capability text of a publication recorded by the start-up scan: the
/// request that made the mount is unknown, so the next stage or publish at
/// that path adopts the record (and writes its own capability).
pub const RECOVERED: &str = "recovered";

/// Whether a ledger record `p` is compatible with a call asking for `desc`.
pub fn same_capability(p: &Publication, desc: &str) -> bool {
    p.capability == desc || recovered(p)
}

/// Whether `p` was recorded by the start-up scan.
pub fn recovered(p: &Publication) -> bool {
    p.capability.ends_with(RECOVERED)
}

/// Lines of node-level reconciliation kept for the admin report.
const HISTORY: usize = 64;
/// First retry of a collection that found a device in use.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between retries of a pending collection.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Node-level findings and actions since start, plus the trigger of the
/// ephemeral collector.
#[derive(Debug, Default)]
pub struct NodeReconcileLog {
    history: Mutex<VecDeque<String>>,
    unrecorded: Mutex<Vec<String>>,
    kick: Arc<tokio::sync::Notify>,
}

impl NodeReconcileLog {
    fn push(&self, line: String) {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(line);
    }

    /// What node-level reconciliation did since start, oldest first (bounded).
    pub fn history(&self) -> Vec<String> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Mounts of our devices that the last scan could not record.
    pub fn unrecorded(&self) -> Vec<String> {
        self.unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the collector for a pass now (after a failed ephemeral unpublish).
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}

/// The directory staging and target paths live under.
fn kubelet_root(driver: &Driver) -> PathBuf {
    let root = driver.cfg.kubelet_root.clone();
    paths::resolve(&root).unwrap_or(root)
}

/// The publication a path of this shape under the kubelet root is, if any:
/// `plugins/kubernetes.io/csi/<driver>/<hash>/globalmount` (and the older
/// `.../csi/pv/<pv>/globalmount`) is a staging path,
/// `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount` a mount publish and
/// `plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<uid>` a block
/// publish.
pub fn path_shape(root: &Path, path: &Path) -> Option<(PublicationKind, bool)> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Vec<&str> = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [
            "plugins",
            "kubernetes.io",
            "csi",
            "volumeDevices",
            "publish",
            _,
            _,
        ] => Some((PublicationKind::Publish, true)),
        ["plugins", "kubernetes.io", "csi", _, _, "globalmount"] => {
            Some((PublicationKind::Stage, false))
        }
        ["pods", _, "volumes", "kubernetes.io~csi", _, "mount"] => {
            Some((PublicationKind::Publish, false))
        }
        _ => None,
    }
}

/// What one mount scan found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Mounts recorded as publications (or, in a dry run, to be recorded).
    pub recorded: Vec<String>,
    /// Mounts of our devices that fit no expected shape: reported only.
    pub unrecorded: Vec<String>,
}

/// Whether the mount `m` shows the device `rdev` (a filesystem on it, or a
/// bind mount of its device node).
async fn shows(host: &dyn Host, m: &MountEntry, rdev: u64) -> bool {
    m.dev == rdev || node_of(host, m).await == Some(rdev)
}

/// The device a bind-mounted device node shows. Only mounts from a device
/// filesystem are looked at: a stat of anything else (a pod's NFS volume
/// under the kubelet root) could hang the scan.
async fn node_of(host: &dyn Host, m: &MountEntry) -> Option<u64> {
    if !matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") {
        return None;
    }
    host.device_number(&m.mount_point).await.ok().flatten()
}

/// Finds mounts of our volumes' devices under the kubelet root that no
/// publication records; records those of the expected shapes (unless
/// `dry_run`), reports the rest. Never unmounts.
pub async fn scan_mounts(driver: &Arc<Driver>, host: &dyn Host, dry_run: bool) -> ScanReport {
    let mut rep = ScanReport::default();
    let mounts = match host.mounts().await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "mount scan: cannot read the mount table");
            return rep;
        }
    };
    let root = kubelet_root(driver);
    // Each mount under the root once, with the device node it binds (if any).
    let mut under = Vec::new();
    for m in mounts.iter().filter(|m| m.mount_point.starts_with(&root)) {
        under.push((m, node_of(host, m).await));
    }
    // Nothing mounted under the root: no volume can have an unrecorded
    // mount, so the ledger is not read at all.
    let listed = if under.is_empty() {
        Ok((Vec::new(), Vec::new()))
    } else {
        blocking(&driver.alloc, |a| {
            Ok((
                a.volumes_where(Some(VolumeState::Ready), None)?,
                a.publications(None)?,
            ))
        })
        .await
    };
    let (vols, pubs) = match listed {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "mount scan: cannot list volumes and publications");
            return rep;
        }
    };
    for v in &vols {
        let Some(dev) = &v.device else { continue };
        let Ok(Some(rdev)) = host.device_number(Path::new(dev)).await else {
            continue;
        };
        let found: Vec<&MountEntry> = under
            .iter()
            .filter(|(m, node)| m.dev == rdev || *node == Some(rdev))
            .map(|(m, _)| *m)
            .collect();
        if found.is_empty() {
            continue;
        }
        // A call in flight on the volume records its own mount.
        let mut lock = match driver.lock_volume(&v.id) {
            Ok(l) => l,
            Err(_) => continue,
        };
        if v.persistency == Persistency::Ephemeral && lock.also(&v.name).is_err() {
            continue;
        }
        let mine: Vec<&Publication> = crate::wire::publications_of(&pubs, &v.id).iter().collect();
        let mut staged = mine.iter().any(|p| p.kind == PublicationKind::Stage);
        for m in found {
            let at = &m.mount_point;
            if mine.iter().any(|p| resolved(&p.path) == *at) {
                continue;
            }
            let what = format!(
                "{} ({} from {}) of volume {} ({})",
                at.display(),
                m.fs_type,
                m.source,
                v.id,
                v.name
            );
            let block = m.dev != rdev;
            let fits = match path_shape(&root, at) {
                Some((PublicationKind::Stage, false)) => {
                    !block && !staged && v.persistency == Persistency::Persistent
                }
                Some((PublicationKind::Publish, b)) => b == block,
                _ => false,
            };
            // Only the top mount at a path is what a later call sees.
            let top = top_mount(&mounts, at).is_some_and(|t| t.mount_id == m.mount_id);
            if !fits || !top {
                tracing::warn!(mount = %what, "mount of our device under the kubelet root has no publication record and no staging or publish shape; reporting it, not unmounting it");
                rep.unrecorded.push(what);
                continue;
            }
            let Some((kind, _)) = path_shape(&root, at) else {
                continue;
            };
            let p = Publication {
                volume_id: v.id.clone(),
                kind,
                path: at.display().to_string(),
                readonly: kind == PublicationKind::Publish && m.read_only(),
                capability: format!(
                    "{};{};;{RECOVERED}",
                    if block { "block" } else { "mount" },
                    if block { "" } else { m.fs_type.as_str() }
                ),
                device: Some(rdev),
            };
            let line = format!("recorded unrecorded {} mount {what}", kind.as_str());
            if dry_run {
                rep.recorded.push(format!("would have {line}"));
                continue;
            }
            match blocking(&driver.alloc, move |a| a.put_publication(&p)).await {
                Ok(()) => {
                    tracing::warn!(mount = %what, kind = kind.as_str(), "recorded a mount of our device that had no publication record (interrupted call)");
                    driver.metrics.mount_recovered();
                    driver.node_reconcile.push(line.clone());
                    rep.recorded.push(line);
                    staged |= kind == PublicationKind::Stage;
                }
                Err(e) => {
                    tracing::warn!(mount = %what, error = %e, "cannot record a mount of our device; reporting it");
                    rep.unrecorded.push(what);
                }
            }
        }
    }
    if !dry_run {
        *driver
            .node_reconcile
            .unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = rep.unrecorded.clone();
        driver.metrics.set_unrecorded_mounts(rep.unrecorded.len());
    }
    rep
}

/// What one ephemeral collection pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CollectReport {
    /// Volumes deleted (or, in a dry run, to be deleted).
    pub deleted: Vec<String>,
    /// Volumes whose delete failed (device still in use, ...): retried.
    pub pending: Vec<String>,
    /// Volumes skipped because a call holds them now.
    pub skipped: Vec<String>,
}

/// Deletes ephemeral inline volumes none of whose publish targets is still
/// a mount of the volume (the pod went away while the daemon was down, an
/// unpublish failed after its unmount, or the mount was removed behind its
/// back), with their ledger rows.
pub async fn collect_ephemeral(
    driver: &Arc<Driver>,
    host: &dyn Host,
    dry_run: bool,
) -> CollectReport {
    let mut rep = CollectReport::default();
    // Only the ready ephemeral rows (by index), not every volume.
    let eph: Vec<Volume> = match blocking(&driver.alloc, |a| {
        a.volumes_where(Some(VolumeState::Ready), Some(Persistency::Ephemeral))
    })
    .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot list volumes to collect ephemeral volumes");
            return rep;
        }
    };
    for v in eph {
        let mut lock = match driver.lock_volume(&v.id) {
            Ok(l) => l,
            Err(_) => {
                rep.skipped.push(v.id.clone());
                continue;
            }
        };
        if lock.also(&v.name).is_err() {
            rep.skipped.push(v.id.clone());
            continue;
        }
        match collect_one(driver, host, &v, dry_run).await {
            Ok(false) => {}
            Ok(true) => {
                let line = format!(
                    "{} ephemeral inline volume {} ({}) of pod {}: no publish target is mounted",
                    if dry_run { "would delete" } else { "deleted" },
                    v.id,
                    v.name,
                    v.context.get(POD_INFO_KEYS[0]).map_or("?", String::as_str)
                );
                if !dry_run {
                    driver.metrics.ephemeral_collected();
                    driver.node_reconcile.push(line.clone());
                }
                rep.deleted.push(line);
            }
            Err(e) => {
                tracing::warn!(volume = %v.id, name = %v.name, error = %e, "cannot collect ephemeral inline volume yet; retrying");
                rep.pending.push(format!(
                    "ephemeral inline volume {} ({}): {e}",
                    v.id, v.name
                ));
            }
        }
    }
    if !dry_run {
        driver.metrics.set_ephemeral_pending(rep.pending.len());
    }
    rep
}

/// Collects one ephemeral volume (its lock held): `Ok(true)` when it was
/// unused and is gone (or would be, in a dry run).
async fn collect_one(
    driver: &Arc<Driver>,
    host: &dyn Host,
    v: &Volume,
    dry_run: bool,
) -> Result<bool, AgentError> {
    let id = v.id.clone();
    // Re-read under the lock: a call that just finished may have changed it.
    let (v, pubs) = match blocking(&driver.alloc, move |a| {
        Ok(a.volume(&id)?.map(|v| (v, a.publications(Some(&id)))))
    })
    .await?
    {
        Some((v, pubs)) => (v, pubs?),
        None => return Ok(false),
    };
    if v.state != VolumeState::Ready {
        return Ok(false);
    }
    let mounts = host.mounts().await?;
    let rdev = match &v.device {
        Some(d) => host.device_number(Path::new(d)).await?,
        None => None,
    };
    let mut live = false;
    for p in pubs.iter().filter(|p| p.kind == PublicationKind::Publish) {
        let at = resolved(&p.path);
        if let Some(e) = top_mount(&mounts, &at) {
            live |= match rdev {
                Some(r) => shows(host, e, r).await,
                None => true,
            };
        }
    }
    if live {
        return Ok(false);
    }
    if dry_run {
        return Ok(true);
    }
    let targets: Vec<&str> = pubs.iter().map(|p| p.path.as_str()).collect();
    tracing::info!(
        volume = %v.id,
        name = %v.name,
        pod = v.context.get(POD_INFO_KEYS[0]).map_or("", String::as_str),
        targets = %targets.join(", "),
        "deleting ephemeral inline volume whose target is no longer mounted"
    );
    let id = v.id.clone();
    blocking(&driver.alloc, move |a| {
        for p in &pubs {
            a.delete_publication(&p.volume_id, p.kind, &p.path)?;
        }
        a.delete_volume(&id)
    })
    .await?;
    Ok(true)
}

/// Runs the ephemeral collection every `interval` (never when zero) and
/// whenever kicked; while a pass leaves volumes pending (device in use),
/// retries with doubling backoff up to the interval.
pub fn spawn_collector(driver: &Arc<Driver>, host: Arc<dyn Host>) -> tokio::task::JoinHandle<()> {
    // Weak: the task must not keep the driver (and the ledger) alive.
    let weak = Arc::downgrade(driver);
    let kick = Arc::clone(&driver.node_reconcile.kick);
    let interval = driver.cfg.ephemeral_collect_interval;
    tokio::spawn(async move {
        let mut retry: Option<Duration> = None;
        loop {
            let wait = retry.or((!interval.is_zero()).then_some(interval));
            let kicked = match wait {
                Some(w) => tokio::select! {
                    _ = kick.notified() => true,
                    _ = tokio::time::sleep(w) => false,
                },
                None => {
                    kick.notified().await;
                    true
                }
            };
            let Some(d) = weak.upgrade() else { return };
            if !d.is_ready() {
                // Before start-up finished (or while a refused ledger
                // waits for recovery) there is nothing to collect.
                continue;
            }
            let rep = collect_ephemeral(&d, host.as_ref(), false).await;
            retry = if rep.pending.is_empty() && rep.skipped.is_empty() {
                None
            } else {
                let next = match retry {
                    Some(r) if !kicked => r.saturating_mul(2),
                    _ => FIRST_RETRY,
                };
                Some(if interval.is_zero() {
                    next.min(MAX_RETRY)
                } else {
                    next.min(interval).min(MAX_RETRY)
                })
            };
        }
    })
}

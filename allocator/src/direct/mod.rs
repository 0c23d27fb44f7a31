//! The `direct` backend: one libnvdimm namespace per volume, managed by
//! writing sysfs attributes (no libndctl, no ndctl subprocess).
//!
//! A volume is a namespace whose `alt_name` is `pmem-agent:<volume id>` (the
//! marker that tells ours from foreign) and whose label uuid is the volume
//! id's uuid. AppDirect volumes are fsdax (a pfn claim with the memmap on
//! the device, 2 MiB alignment); FileIO volumes are sector mode (a btt claim
//! with 4 KiB sectors).
//!
//! Design points:
//! - **Sizes.** The ledger extent is the namespace size (a multiple of the
//!   region alignment and of 2 MiB × interleave ways). At open each usable
//!   region's `align` is lowered from the kernel's 16 MiB default to 2 MiB
//!   per DIMM (not persistent: done at every start), so that every multiple
//!   of 2 MiB is an exact fsdax size (512 MiB usable = 522 MiB namespace,
//!   which 16 MiB granularity cannot express). Capacity is reported
//!   in usable bytes: [`layout`] computes exactly what the pfn/btt device on
//!   an extent exposes, and `extent_for` is its inverse, so GetCapacity's
//!   maximum is exactly what a create then gets.
//! - **Placement.** libnvdimm, not us, picks a new namespace's offset: the
//!   first hole that fits. The backend asks the allocator for first-fit
//!   placement, accounts for every namespace already present (`reserved`),
//!   waits while an earlier extent of the same region is still being
//!   created, and checks where the kernel put the namespace: a mismatch is
//!   undone and fails.
//! - **Undo.** A failed create undoes exactly the writes it made, in reverse;
//!   after a successful bind that means the full teardown.
//! - **Teardown** is ndctl's: refuse a busy device (O_EXCL), unbind the
//!   claim, detach it, bind the namespace raw with `force_raw`, zero the
//!   info block, unbind, `size` 0.
//! - **Erase.** The namespace is the only window onto its space, so a
//!   deleted volume keeps it until it is zeroed: `retire` takes the claim
//!   off (the tenant's device is gone), wipes the info block (a reboot
//!   cannot bring the claim back), renames it to the erasing marker
//!   `pmem-agent-erasing:<volume id>` (never taken for a volume, and an
//!   orphan of ours when the ledger has no row) and leaves it bound raw;
//!   `erase` zeroes and verifies the raw device in chunks; `destroy` then
//!   frees the space. A crash anywhere resumes from the namespace's state.
//! - **Locking.** A mutex per region around seed/bind sequences; different
//!   regions proceed in parallel.
//! - **Block devices.** After a bind the backend polls sysfs for the block
//!   device (deadline `device_timeout`) and creates `/dev/<name>` from its
//!   major:minor when devtmpfs or udev has not.
//!
//! Crash-test hook, compiled in only with the `test-hooks` feature (the rig
//! builds `--features pmem-agent/test-hooks`):
//! `PMEM_AGENT_TEST_PAUSE_AT=after-size|after-bind` makes a create stop
//! forever at that step, so a test can kill the daemon there. Builds
//! without the feature ignore the variable.

pub mod layout;
pub mod model;
pub mod namespace;
pub mod sysfs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{
    Allocated, Backend, Device, DeviceRequest, InventoryItem, Owner, Placement, Progress,
    RegionStamp,
};
use crate::error::{Error, Result};
use crate::region::RegionSpec;
use crate::units::{Bytes, MIB};
use crate::volume::Usage;
use layout::PFN_ALIGN;
use namespace::{
    BlockInfo, ClaimKind, DEVICES, NSTYPE_IO, NSTYPE_PMEM, NamespaceInfo, RegionInfo, Tree,
    WriteError,
};
use sysfs::{BlockDevices, RealBlockDevices, RealSysfs, Sysfs};

/// `alt_name` prefix of our namespaces (the same marker as the sim backend's).
pub const MARKER: &str = crate::sim::MARKER;

/// `alt_name` prefix of the identity namespace we keep in each region: a
/// small raw namespace of ours (one alignment unit, one label slot) whose
/// name carries the ledger's id (`pmem-agent-id:<32 hex>`, identity.rs). It
/// is reserved like a foreign namespace, so capacity excludes it exactly.
pub const IDENTITY_PREFIX: &str = "pmem-agent-id:";

/// The region alignment (per DIMM) the backend asks for: the fsdax page
/// size, the finest the kernel's fsdax start rule (`memremap_compat_align`,
/// 2 MiB on x86-64) allows. With it every multiple of 2 MiB is an fsdax
/// volume's exact usable size (layout.rs).
pub const NAMESPACE_ALIGN: u64 = PFN_ALIGN;

/// libnvdimm's limit for `alt_name` (NSLABEL_NAME_LEN, with the NUL).
const NAME_MAX: usize = 63;
/// Bytes an erase zeroes (and verifies) per step.
const ERASE_CHUNK: u64 = 64 * MIB;
/// What ndctl zeroes to wipe a claim's info block (it sits at 4 KiB).
const INFO_WIPE: u64 = 8192;
const POLL: Duration = Duration::from_millis(10);
/// How long a create waits for an earlier hole to fill when no create
/// before it is known to be under way.
const PLACEMENT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct DirectConfig {
    /// Where sysfs is mounted.
    pub sysfs_root: PathBuf,
    /// Where block device nodes are (and are created when missing).
    pub dev_dir: PathBuf,
    /// How long to wait for a block device after a bind.
    pub device_timeout: Duration,
    /// How long a create waits for earlier extents of its region to be
    /// created first (the kernel allocates first-fit).
    pub placement_timeout: Duration,
    /// `alt_name` prefix that marks a namespace as ours ([`MARKER`]; the
    /// LVM backend's physical volumes use their own, so neither mode takes
    /// the other's namespaces for orphans).
    pub marker: String,
    /// Keep the ledger's identity in an identity namespace per region
    /// (identity.rs). Always on in the daemon; off only for unit tests of
    /// sysfs sequences whose exact offsets predate identities.
    pub identity: bool,
    /// Namespace alignment per DIMM to write to each usable region's
    /// `align` at open ([`NAMESPACE_ALIGN`]): the kernel boots with 16 MiB,
    /// which makes no round fsdax size servable, and forgets a written
    /// value at reboot. `None` leaves the regions as they are (the lvm
    /// backend's physical-volume namespaces need no round sizes).
    pub namespace_align: Option<u64>,
}

impl Default for DirectConfig {
    fn default() -> DirectConfig {
        DirectConfig {
            sysfs_root: PathBuf::from("/sys"),
            dev_dir: PathBuf::from("/dev"),
            device_timeout: Duration::from_secs(10),
            placement_timeout: Duration::from_secs(10),
            marker: MARKER.to_owned(),
            identity: true,
            namespace_align: Some(NAMESPACE_ALIGN),
        }
    }
}

#[derive(Debug)]
struct RegionSlot {
    name: String,
    /// Held around every seed/bind sequence in the region.
    lock: Mutex<()>,
    /// Signalled when a namespace of the region appears or goes away.
    changed: Condvar,
}

#[derive(Debug)]
pub struct DirectBackend {
    sys: Arc<dyn Sysfs>,
    devs: Arc<dyn BlockDevices>,
    cfg: DirectConfig,
    regions: Vec<RegionSlot>,
    /// Volumes being created (begin_create was called), with their region and
    /// offset: only their namespaces may be initialised (a ready volume's
    /// never is: its data would go), and creates placed after them wait.
    fresh: Mutex<HashMap<String, (String, u64)>>,
    /// Short form (8 hex digits) of the ledger's id that new namespaces'
    /// markers carry: `pmem-agent:<short>:<volume id>`.
    ledger_short: Mutex<Option<String>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn claim_kind(usage: Usage) -> ClaimKind {
    match usage {
        Usage::AppDirect => ClaimKind::Pfn,
        Usage::FileIo => ClaimKind::Btt,
    }
}

/// The marker of a deleted volume's namespace while it is erased:
/// `pmem-agent:` becomes `pmem-agent-erasing:`.
fn erasing_prefix(prefix: &str) -> String {
    format!("{}-erasing:", prefix.trim_end_matches(':'))
}

fn marker_with(prefix: &str, volume_id: &str) -> Result<String> {
    marker_for(prefix, None, volume_id)
}

/// A volume's marker, with the ledger's short id when it is known.
fn marker_for(prefix: &str, short: Option<&str>, volume_id: &str) -> Result<String> {
    let m = match short {
        Some(s) => format!("{prefix}{s}:{volume_id}"),
        None => format!("{prefix}{volume_id}"),
    };
    if m.len() > NAME_MAX {
        return Err(Error::InvalidArgument(format!(
            "volume id {volume_id:?} is too long for a namespace name ({} > {NAME_MAX} bytes)",
            m.len()
        )));
    }
    Ok(m)
}

/// The volume id in a marker, with or without a ledger short id
/// (`<prefix>[<8 hex>:]<volume id>`); `None` when it is not ours.
fn marked_volume<'a>(prefix: &str, alt_name: &'a str) -> Option<&'a str> {
    let rest = alt_name.strip_prefix(prefix)?;
    match rest.split_once(':') {
        Some((short, id)) if short.len() == 8 && short.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(id)
        }
        _ => Some(rest),
    }
}

/// The label uuid of a volume's namespace: the uuid inside our volume ids
/// (`pmem-<32 hex>`), so `ndctl list -v` shows it as `raw_uuid`.
fn namespace_uuid(volume_id: &str) -> String {
    volume_id
        .strip_prefix("pmem-")
        .and_then(|h| uuid::Uuid::try_parse(h).ok())
        .unwrap_or_else(uuid::Uuid::new_v4)
        .hyphenated()
        .to_string()
}

/// Stops forever at a named step when the crash-test hook asks for it.
#[cfg(feature = "test-hooks")]
fn pause_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("PMEM_AGENT_TEST_PAUSE_AT").ok());
    if at.as_deref() == Some(step) {
        tracing::warn!(step, "PMEM_AGENT_TEST_PAUSE_AT: pausing here until killed");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
fn pause_point(_step: &str) {}

/// The state of one of our namespaces, as far as the backend cares.
#[derive(Debug)]
enum NsState {
    /// The expected claim is bound; the volume's device exists.
    Active { claim: String, block: BlockInfo },
    /// The expected claim is attached but not bound (disabled).
    Disabled { claim: String },
    /// Claimed by a device of another kind.
    OtherClaim { claim: String },
    /// Bound without a claim (raw mode), e.g. a half-made one after a reboot.
    Raw,
    /// Sized, nothing attached.
    Idle,
}

/// A write a create made, for undo.
#[derive(Debug)]
enum Step {
    AltName(String),
    Size(String),
    HolderClass(String),
    ClaimNamespace(String),
    /// A claim of this namespace was bound (an info block was written).
    Bound(String),
}

/// How much of a namespace a teardown zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wipe {
    /// The claim's info block (what ndctl does).
    Info,
    /// Everything, verified (eraseAfter).
    All,
}

impl DirectBackend {
    /// The backend on the real sysfs and /dev.
    pub fn open(cfg: DirectConfig) -> Result<DirectBackend> {
        let sys = Arc::new(RealSysfs::new(&cfg.sysfs_root));
        let devs = Arc::new(RealBlockDevices::new(&cfg.dev_dir));
        DirectBackend::with(sys, devs, cfg)
    }

    /// The backend on any implementation of the two traits (tests: the model).
    pub fn with(
        sys: Arc<dyn Sysfs>,
        devs: Arc<dyn BlockDevices>,
        cfg: DirectConfig,
    ) -> Result<DirectBackend> {
        if !sys.exists(DEVICES) {
            return Err(Error::FailedPrecondition(format!(
                "no libnvdimm bus at {}: this host has no NVDIMM regions, or the nfit and nd_pmem modules are not loaded (modprobe nfit nd_pmem nd_btt)",
                sys.display(DEVICES)
            )));
        }
        let writable = sys
            .writable()
            .map_err(|e| Error::io(format!("statvfs {}", sys.display("")), e))?;
        if !writable {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted read-only, and the direct backend manages namespaces by writing to it; mount sysfs read-write into the container (docker: --privileged, or -v /sys:/sys:rw; Kubernetes: a privileged container with a hostPath volume for /sys), or use --backend sim",
                sys.display("")
            )));
        }
        let tree = Tree::new(sys.as_ref());
        let mut regions = Vec::new();
        for name in tree.devices()? {
            if !name.starts_with("region") {
                continue;
            }
            // Volatile and BLK regions are not ours to carve.
            match tree.read_opt(&name, "devtype")?.as_deref() {
                None | Some("nd_pmem") => {}
                Some(other) => {
                    tracing::info!(region = %name, devtype = other, "skipping non-PMEM region");
                    continue;
                }
            }
            regions.push(RegionSlot {
                name,
                lock: Mutex::new(()),
                changed: Condvar::new(),
            });
        }
        let b = DirectBackend {
            sys,
            devs,
            cfg,
            regions,
            fresh: Mutex::new(HashMap::new()),
            ledger_short: Mutex::new(None),
        };
        if let Some(per_dimm) = b.cfg.namespace_align {
            for s in &b.regions {
                b.apply_namespace_align(&s.name, per_dimm)?;
            }
        }
        Ok(b)
    }

    /// Writes the region's namespace alignment (`per_dimm` × interleave
    /// ways) when it differs; before any placement, as the value decides
    /// which sizes the kernel accepts and where it puts new namespaces.
    /// Namespaces already allocated keep their place. A kernel that
    /// refuses (no `align` attribute before Linux 5.7, or a value it does
    /// not accept) leaves the region at its alignment: sizes then round to
    /// it, and the refusal is logged, not fatal.
    fn apply_namespace_align(&self, region: &str, per_dimm: u64) -> Result<()> {
        let info = self.region_info(region)?;
        if Self::refusal(&info).is_some() {
            return Ok(());
        }
        let want = per_dimm * info.ways();
        if info.align == want {
            return Ok(());
        }
        match self.write(region, "align", &want.to_string()) {
            Ok(()) => {
                let now = self.region_info(region)?.align;
                tracing::info!(region, from = %Bytes(info.align), to = %Bytes(now), "region namespace alignment set");
            }
            Err(e) => {
                tracing::warn!(region, align = %Bytes(info.align), "the kernel refused the region alignment {}: {e}; volume sizes round to {}", Bytes(want), Bytes(info.align));
            }
        }
        Ok(())
    }

    /// The identity namespaces of a region (normally at most one).
    fn identity_namespaces(&self, region: &str) -> Result<Vec<NamespaceInfo>> {
        Ok(self
            .tree()
            .namespaces(region)?
            .into_iter()
            .filter(|n| n.size > 0 && !n.io && n.alt_name.starts_with(IDENTITY_PREFIX))
            .collect())
    }

    /// Makes the identity namespace (region lock held): uuid, name, size on
    /// the seed, raw (no claim, never bound: nothing reads or writes it).
    fn make_identity(&self, info: &RegionInfo, ledger_id: &str) -> Result<()> {
        let t = self.tree();
        let seed = t.read(&info.name, "namespace_seed")?;
        let s = t.namespace(&seed)?;
        if s.size != 0 || s.driver.is_some() || s.holder.is_some() {
            return Err(Error::Busy(format!(
                "seed namespace {seed} of {} is not idle; is another tool creating a namespace? retry",
                info.name
            )));
        }
        // Label uuids are unique on the bus: a fresh one per region (the
        // ledger id is in the name).
        let uuid = uuid::Uuid::new_v4().hyphenated().to_string();
        let size = Self::extent_align(info);
        let r = self
            .write(&seed, "uuid", &uuid)
            .and_then(|()| self.write(&seed, "alt_name", &format!("{IDENTITY_PREFIX}{ledger_id}")))
            .and_then(|()| self.write(&seed, "sector_size", "512"))
            .and_then(|()| self.write(&seed, "size", &size.to_string()))
            // Bound raw (force_raw: never probed for an old claim's info
            // block) so the kernel moves the region's seed on, as a reboot
            // would bind it anyway.
            .and_then(|()| self.write(&seed, "force_raw", "1"))
            .and_then(|()| self.bind(&seed));
        if let Err(e) = r {
            let _ = self.unbind(&seed);
            let _ = self.write(&seed, "force_raw", "0");
            let _ = self.write(&seed, "size", "0");
            let _ = self.write(&seed, "alt_name", "");
            return Err(Error::Device(format!(
                "create the identity namespace of {} ({} bytes, one label slot): {e}",
                info.name,
                Bytes(size)
            )));
        }
        tracing::info!(region = %info.name, namespace = %seed, ledger_id, "identity namespace created");
        Ok(())
    }

    /// Zeroes the first `len` bytes of one of our block devices (the lvm
    /// backend's new physical volumes, before pvcreate).
    pub fn zero_head(&self, node: &std::path::Path, len: u64) -> Result<()> {
        self.devs
            .zero(node, 0, len, false)
            .map_err(|e| Error::io(format!("zero the head of {}", node.display()), e))
    }

    fn tree(&self) -> Tree<'_> {
        Tree::new(self.sys.as_ref())
    }

    fn slot(&self, region: &str) -> Result<&RegionSlot> {
        self.regions
            .iter()
            .find(|s| s.name == region)
            .ok_or_else(|| Error::NotFound(format!("libnvdimm region {region} does not exist")))
    }

    fn region_info(&self, region: &str) -> Result<RegionInfo> {
        self.tree().region(region)
    }

    /// Why a region cannot hold per-volume namespaces, if it cannot.
    fn refusal(info: &RegionInfo) -> Option<String> {
        let r = &info.name;
        if !info.enabled {
            return Some(format!(
                "region {r} is disabled; enable it with: ndctl enable-region {r}"
            ));
        }
        if info.nstype == NSTYPE_IO {
            return Some(format!(
                "region {r} is label-less (nstype 4): it can only hold one namespace covering the whole region, not one per volume; initialise namespace labels (this destroys the existing raw namespace and its data): ndctl disable-region all; ndctl init-labels all; ndctl enable-region all; then restart pmem-agent"
            ));
        }
        if info.nstype != NSTYPE_PMEM {
            return Some(format!(
                "region {r} has namespace type {}, not PMEM (5)",
                info.nstype
            ));
        }
        if info.read_only {
            return Some(format!(
                "region {r} is read-only (read_only=1); clear it with: echo 0 > /sys/bus/nd/devices/{r}/read_only"
            ));
        }
        None
    }

    /// Every extent of a region is a multiple of this: the region alignment
    /// and the fsdax page alignment on each interleaved DIMM.
    fn extent_align(info: &RegionInfo) -> u64 {
        layout::lcm(info.align.max(4096), PFN_ALIGN * info.ways())
    }

    fn spec_of(&self, info: &RegionInfo) -> Result<RegionSpec> {
        let align = Self::extent_align(info);
        let ns_slots = if Self::refusal(info).is_some() {
            0
        } else {
            // Free label slots plus the namespaces that already hold one,
            // so the allocator's count of extents in use matches.
            let mut free = u32::MAX;
            for d in info.dimms() {
                free = free.min(self.tree().dimm_slots(&d)?.unwrap_or(0));
            }
            let present = self
                .tree()
                .namespaces(&info.name)?
                .iter()
                .filter(|n| n.size > 0 && !n.io)
                .count();
            free.saturating_add(u32::try_from(present).unwrap_or(u32::MAX))
        };
        Ok(RegionSpec {
            id: info.name.clone(),
            size: Bytes(info.size).align_down(Bytes(align)),
            align: Bytes(align),
            ns_slots,
            numa_node: info.numa_node,
            location: format!(
                "{} ({})",
                self.sys.display(&format!("{DEVICES}/{}", info.name)),
                info.dimms().join("+")
            ),
        })
    }

    fn is_fresh(&self, volume_id: &str) -> bool {
        relock(&self.fresh).contains_key(volume_id)
    }

    /// Whether a create before `req`'s offset in its region is under way.
    fn creating_before(&self, req: &DeviceRequest) -> bool {
        relock(&self.fresh)
            .iter()
            .any(|(id, (r, o))| *id != req.volume_id && *r == req.region && *o < req.offset.0)
    }

    /// Our namespace of a volume in a region (by marker), at any offset.
    fn ours(&self, info: &RegionInfo, volume_id: &str) -> Result<Option<NamespaceInfo>> {
        self.named(info, &self.cfg.marker, volume_id)
    }

    /// A deleted volume's namespace being erased (by its erasing marker).
    fn erasing(&self, info: &RegionInfo, volume_id: &str) -> Result<Option<NamespaceInfo>> {
        self.named(info, &erasing_prefix(&self.cfg.marker), volume_id)
    }

    /// The volume id in an `alt_name` of ours (live or erasing).
    fn volume_of<'a>(&self, alt_name: &'a str) -> Option<&'a str> {
        marked_volume(&self.cfg.marker, alt_name)
            .or_else(|| marked_volume(&erasing_prefix(&self.cfg.marker), alt_name))
    }

    fn named(
        &self,
        info: &RegionInfo,
        prefix: &str,
        volume_id: &str,
    ) -> Result<Option<NamespaceInfo>> {
        marker_with(prefix, volume_id)?;
        let mut found: Vec<NamespaceInfo> = self
            .tree()
            .namespaces(&info.name)?
            .into_iter()
            .filter(|n| n.size > 0 && marked_volume(prefix, &n.alt_name) == Some(volume_id))
            .collect();
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(Error::Device(format!(
                "several namespaces in {} carry the marker of volume {volume_id}: {}; remove the extra ones with ndctl",
                info.name,
                found
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Fails when our namespace is not where the ledger says.
    fn check_extent(info: &RegionInfo, ns: &NamespaceInfo, req: &DeviceRequest) -> Result<()> {
        let off = ns.offset(info);
        if off != Some(req.offset.0) || ns.size != req.size.0 {
            return Err(Error::Device(format!(
                "namespace {} of volume {} is at offset {} with {} bytes in {}, but the ledger has {}+{}",
                ns.name,
                req.volume_id,
                off.map_or_else(|| "?".to_owned(), |o| o.to_string()),
                ns.size,
                info.name,
                req.offset.0,
                req.size.0
            )));
        }
        Ok(())
    }

    fn state(&self, ns: &NamespaceInfo, want: ClaimKind) -> Result<NsState> {
        if let Some(h) = &ns.holder {
            let c = self.tree().claim(h)?;
            if c.kind != want {
                return Ok(NsState::OtherClaim { claim: h.clone() });
            }
            if c.bound
                && let Some(block) = self.tree().block(h)?
            {
                return Ok(NsState::Active {
                    claim: h.clone(),
                    block,
                });
            }
            return Ok(NsState::Disabled { claim: h.clone() });
        }
        Ok(if ns.driver.is_some() {
            NsState::Raw
        } else {
            NsState::Idle
        })
    }

    fn write(&self, dev: &str, attr: &str, value: &str) -> Result<(), WriteError> {
        self.tree().write(dev, attr, value)
    }

    fn bind(&self, dev: &str) -> Result<(), WriteError> {
        self.tree().write_path(namespace::ND_PMEM_BIND, dev)
    }

    fn unbind(&self, dev: &str) -> Result<(), WriteError> {
        self.tree()
            .write_path(&format!("{DEVICES}/{dev}/driver/unbind"), dev)
    }

    /// Polls sysfs for the block device of `dev` and makes sure its node exists.
    fn wait_block(&self, dev: &str) -> Result<(BlockInfo, PathBuf)> {
        let deadline = Instant::now() + self.cfg.device_timeout;
        loop {
            if let Some(b) = self.tree().block(dev)? {
                match self.devs.node(&b.name, b.major, b.minor) {
                    Ok(p) if self.devs.udev_settled(b.major, b.minor) => return Ok((b, p)),
                    Ok(p) if Instant::now() >= deadline => {
                        // The node is there; udevd is slow or wedged.
                        tracing::warn!(device = %b.name, timeout = ?self.cfg.device_timeout, "udevd has not processed the device yet; going on without it");
                        return Ok((b, p));
                    }
                    Ok(_) => {}
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::io(
                            format!(
                                "device node of {} ({}:{}) for {dev}",
                                b.name, b.major, b.minor
                            ),
                            e,
                        ));
                    }
                    Err(_) => {}
                }
            } else if Instant::now() >= deadline {
                return Err(Error::Device(format!(
                    "no block device appeared for {dev} within {:?} of binding it",
                    self.cfg.device_timeout
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn refuse_busy(&self, node: &std::path::Path, what: &str) -> Result<()> {
        let busy = self
            .devs
            .is_busy(node)
            .map_err(|e| Error::io(format!("check {} of {what}", node.display()), e))?;
        if busy {
            return Err(Error::FailedPrecondition(format!(
                "device {} of {what} is in use (mounted or open exclusively)",
                node.display()
            )));
        }
        Ok(())
    }

    /// Waits (region lock held) until the kernel's first fit for this
    /// request is the ledger's offset, or our namespace already exists.
    fn await_placement<'a>(
        &'a self,
        slot: &'a RegionSlot,
        req: &DeviceRequest,
    ) -> Result<MutexGuard<'a, ()>> {
        let start = Instant::now();
        let deadline = start + self.cfg.placement_timeout;
        // Without a create under way before ours, an earlier hole can only
        // appear after a short race (a create between its intent and its
        // wipe_head), so wait briefly.
        let grace = start + self.cfg.placement_timeout.min(PLACEMENT_GRACE);
        let mut guard = relock(&slot.lock);
        loop {
            let info = self.region_info(&slot.name)?;
            if self.ours(&info, &req.volume_id)?.is_some() {
                return Ok(guard);
            }
            let spaces = self.tree().namespaces(&info.name)?;
            let used: Vec<(u64, u64)> = spaces
                .iter()
                .filter(|n| n.size > 0)
                .filter_map(|n| Some((n.offset(&info)?, n.size)))
                .collect();
            let at = namespace::kernel_first_fit(info.size, info.align.max(1), &used, req.size.0);
            match at {
                Some(o) if o == req.offset.0 => return Ok(guard),
                // An earlier hole: normally an extent placed before ours
                // that is still being created. Wait for it.
                Some(o) if o < req.offset.0 => {
                    let pending = self.creating_before(req);
                    let until = if pending { deadline } else { grace };
                    let now = Instant::now();
                    if now < until {
                        let left = until.saturating_duration_since(now);
                        guard = slot
                            .changed
                            .wait_timeout(guard, left.min(Duration::from_millis(500)))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        continue;
                    }
                    if pending {
                        return Err(Error::Busy(format!(
                            "the kernel would place volume {}'s namespace at offset {o} of {}, before its ledger extent at {}: the create of an earlier extent did not finish within {:?}; retry",
                            req.volume_id, info.name, req.offset.0, self.cfg.placement_timeout
                        )));
                    }
                    return Err(Error::FailedPrecondition(format!(
                        "the kernel would place volume {}'s namespace at offset {o} of {}, but the ledger holds that space (its extent is at {}): a volume's namespace there is missing, or a namespace was removed behind pmem-agent's back; see pmemctl reconcile, delete the broken volume or restart pmem-agent",
                        req.volume_id, info.name, req.offset.0
                    )));
                }
                _ => {
                    let end = req.offset.0 + req.size.0;
                    let in_the_way: Vec<String> = spaces
                        .iter()
                        .filter(|n| n.size > 0)
                        .filter(|n| {
                            n.offset(&info)
                                .is_some_and(|o| o < end && o + n.size > req.offset.0)
                        })
                        .map(|n| format!("{} ({:?})", n.name, n.alt_name))
                        .collect();
                    return Err(Error::Device(format!(
                        "extent {}+{} of {} for volume {} is not free in the kernel (occupied by {}); a namespace was created behind pmem-agent's back: restart pmem-agent so it accounts for it",
                        req.offset.0,
                        req.size.0,
                        info.name,
                        req.volume_id,
                        if in_the_way.is_empty() {
                            "nothing the backend can see".to_owned()
                        } else {
                            in_the_way.join(", ")
                        }
                    )));
                }
            }
        }
    }

    /// Writes uuid, name, sector size and size on the region's seed.
    fn make_namespace(
        &self,
        info: &RegionInfo,
        req: &DeviceRequest,
        undo: &mut Vec<Step>,
    ) -> Result<NamespaceInfo> {
        let t = self.tree();
        let seed = t.read(&info.name, "namespace_seed")?;
        let s = t.namespace(&seed)?;
        if s.size != 0 || s.driver.is_some() || s.holder.is_some() {
            return Err(Error::Busy(format!(
                "seed namespace {seed} of {} is not idle (size {}, holder {:?}); is another tool creating a namespace? retry",
                info.name, s.size, s.holder
            )));
        }
        self.write(&seed, "uuid", &namespace_uuid(&req.volume_id))?;
        // Writing size 0 frees the space and the uuid: one undo for both.
        undo.push(Step::Size(seed.clone()));
        let short = relock(&self.ledger_short).clone();
        self.write(
            &seed,
            "alt_name",
            &marker_for(&self.cfg.marker, short.as_deref(), &req.volume_id)?,
        )?;
        undo.push(Step::AltName(seed.clone()));
        self.write(&seed, "sector_size", "512")?;
        self.write(&seed, "size", &req.size.0.to_string())
            .map_err(|e| {
                let hint = match e.errno() {
                    Some(libc::EINVAL) => {
                        format!(" (not a multiple of the region alignment {}?)", info.align)
                    }
                    Some(libc::ENOSPC) => {
                        " (no free space or label slot of that size in the kernel's view)"
                            .to_owned()
                    }
                    _ => String::new(),
                };
                Error::Device(format!("{e}{hint}"))
            })?;
        pause_point("after-size");
        let ns = t.namespace(&seed)?;
        if ns.offset(info) != Some(req.offset.0) {
            return Err(Error::Device(format!(
                "the kernel placed namespace {seed} of volume {} at offset {:?} of {}, but the ledger chose {}",
                req.volume_id,
                ns.offset(info),
                info.name,
                req.offset.0
            )));
        }
        Ok(ns)
    }

    /// Attaches the region's pfn or btt seed to the namespace and binds it.
    fn attach(
        &self,
        info: &RegionInfo,
        ns: &NamespaceInfo,
        want: ClaimKind,
        undo: &mut Vec<Step>,
    ) -> Result<()> {
        self.write(&ns.name, "holder_class", want.class())?;
        undo.push(Step::HolderClass(ns.name.clone()));
        let t = self.tree();
        let c = t.read(&info.name, want.seed_attr())?;
        let ci = t.claim(&c)?;
        if !ci.namespace.is_empty() || ci.bound {
            return Err(Error::Busy(format!(
                "{} seed {c} of {} is not idle (namespace {:?}); retry",
                want.class(),
                info.name,
                ci.namespace
            )));
        }
        self.write(&c, "uuid", &uuid::Uuid::new_v4().hyphenated().to_string())?;
        match want {
            ClaimKind::Btt => self.write(&c, "sector_size", &layout::BTT_SECTOR.to_string())?,
            _ => {
                // mode pmem: the memmap lives on the device, not in RAM.
                self.write(&c, "mode", "pmem")?;
                self.write(&c, "align", &PFN_ALIGN.to_string())?;
            }
        }
        self.write(&c, "namespace", &ns.name)?;
        undo.push(Step::ClaimNamespace(c.clone()));
        self.bind(&c).map_err(|e| {
            Error::Device(format!(
                "{e} (the kernel refused {} mode on {}; see dmesg)",
                want.mode_name(),
                ns.name
            ))
        })?;
        undo.push(Step::Bound(ns.name.clone()));
        pause_point("after-bind");
        Ok(())
    }

    /// Brings our namespace to the expected mode and returns its device.
    /// `init` allows attaching a new claim (fresh volumes only); a ready
    /// volume's attached claim is only enabled again.
    fn activate(
        &self,
        info: &RegionInfo,
        ns: &NamespaceInfo,
        req: &DeviceRequest,
        init: bool,
        undo: &mut Vec<Step>,
    ) -> Result<Device> {
        let want = claim_kind(req.usage);
        // Each pass changes one thing; a namespace needs at most three.
        for _ in 0..4 {
            let ns = self.tree().namespace(&ns.name)?;
            match self.state(&ns, want)? {
                NsState::Active { claim, .. } => {
                    let (block, node) = self.wait_block(&claim)?;
                    let expected = layout::usable(ns.size, req.usage);
                    if block.bytes < expected {
                        return Err(Error::Device(format!(
                            "{} of volume {} has {} bytes, less than the {expected} computed for a {} namespace of {} bytes",
                            block.name,
                            req.volume_id,
                            block.bytes,
                            want.mode_name(),
                            ns.size
                        )));
                    }
                    return Ok(Device {
                        path: Some(node.display().to_string()),
                        size: Bytes(block.bytes),
                    });
                }
                NsState::Disabled { claim } => {
                    // Re-enabling an attached claim keeps its info block.
                    self.bind(&claim)?;
                    if init {
                        undo.push(Step::Bound(ns.name.clone()));
                    }
                }
                NsState::OtherClaim { claim } => {
                    return Err(Error::Device(format!(
                        "namespace {} of volume {} is claimed by {claim}, not by a {} device; inspect it with ndctl list -N",
                        ns.name,
                        req.volume_id,
                        want.class()
                    )));
                }
                NsState::Raw | NsState::Idle if !init => {
                    return Err(Error::Device(format!(
                        "namespace {} of volume {} has no {} claim (mode {}); refusing to re-initialise a ready volume's namespace, which would lose its data; inspect it with ndctl list -N",
                        ns.name,
                        req.volume_id,
                        want.mode_name(),
                        ns.mode
                    )));
                }
                NsState::Raw => {
                    // A half-made namespace that a reboot bound raw.
                    if let Some(b) = self.tree().block(&ns.name)? {
                        let node = self
                            .devs
                            .node(&b.name, b.major, b.minor)
                            .map_err(|e| Error::io(format!("device node of {}", b.name), e))?;
                        self.refuse_busy(&node, &format!("volume {}", req.volume_id))?;
                    }
                    self.unbind(&ns.name)?;
                }
                NsState::Idle => {
                    self.attach(info, &ns, want, undo)?;
                }
            }
        }
        Err(Error::Device(format!(
            "namespace {} of volume {} does not settle in {} mode",
            ns.name,
            req.volume_id,
            want.mode_name()
        )))
    }

    /// `fresh`: the volume is being created (begin_create was called), so its
    /// namespace may be made or initialised; otherwise only re-enabled.
    fn create_locked(&self, info: &RegionInfo, req: &DeviceRequest, fresh: bool) -> Result<Device> {
        let mut undo = Vec::new();
        let ns = match self.ours(info, &req.volume_id)? {
            Some(ns) => {
                Self::check_extent(info, &ns, req)?;
                ns
            }
            None if !fresh => return Err(Self::gone(info, req)),
            None => match self.make_namespace(info, req, &mut undo) {
                Ok(ns) => ns,
                Err(e) => return Err(self.rolled_back(info, undo, e)),
            },
        };
        match self.activate(info, &ns, req, fresh, &mut undo) {
            Ok(d) => Ok(d),
            Err(e) => Err(self.rolled_back(info, undo, e)),
        }
    }

    /// A ready volume's namespace that vanished is not made again: a new
    /// claim over the old space would pass off stale (for BTT: scrambled)
    /// data as the volume.
    fn gone(info: &RegionInfo, req: &DeviceRequest) -> Error {
        Error::Device(format!(
            "the namespace of volume {} is gone from {} (destroyed outside pmem-agent?); not re-creating it over extent {}+{}, its data cannot be trusted; delete the volume",
            req.volume_id, info.name, req.offset.0, req.size.0
        ))
    }

    /// Undoes a failed create's writes in reverse; returns the original
    /// error with what the undo could not do appended.
    fn rolled_back(&self, info: &RegionInfo, undo: Vec<Step>, e: Error) -> Error {
        if undo.is_empty() {
            return e;
        }
        let mut failed = Vec::new();
        let bound = undo.iter().find_map(|s| match s {
            Step::Bound(n) => Some(n.clone()),
            _ => None,
        });
        let ns = undo.iter().find_map(|s| match s {
            Step::Size(n) | Step::HolderClass(n) | Step::AltName(n) | Step::Bound(n) => {
                Some(n.clone())
            }
            Step::ClaimNamespace(_) => None,
        });
        if let Some(ns) = &bound {
            // A bind wrote an info block: undoing it is the full teardown.
            if let Err(t) = self
                .teardown(info, ns, Wipe::Info)
                .and_then(|()| self.delete(ns))
            {
                failed.push(t.to_string());
            }
        } else {
            for s in undo.iter().rev() {
                let r = match s {
                    Step::ClaimNamespace(c) => self.write(c, "namespace", ""),
                    Step::HolderClass(n) => self.write(n, "holder_class", ""),
                    Step::Size(n) => self.write(n, "size", "0"),
                    Step::AltName(n) => self.write(n, "alt_name", ""),
                    Step::Bound(_) => Ok(()),
                };
                if let Err(u) = r {
                    failed.push(u.to_string());
                }
            }
        }
        if failed.is_empty() {
            tracing::info!(region = %info.name, namespace = ?ns, "undid a failed create");
            return e;
        }
        let msg = format!(
            "{e}; undo incomplete ({}); reconciliation will retry",
            failed.join("; ")
        );
        match e {
            Error::FailedPrecondition(_) => Error::FailedPrecondition(msg),
            Error::Busy(_) => Error::Busy(msg),
            _ => Error::Device(msg),
        }
    }

    /// Takes the claim off a namespace of ours and leaves it bound raw
    /// (`force_raw`) with `wipe` applied; refuses a device in use.
    fn teardown(&self, info: &RegionInfo, ns_name: &str, wipe: Wipe) -> Result<()> {
        let node = self.to_raw(info, ns_name)?;
        let ns = self.tree().namespace(ns_name)?;
        let len = match wipe {
            Wipe::Info => INFO_WIPE.min(ns.size),
            Wipe::All => ns.size,
        };
        self.devs
            .zero(&node, 0, len, wipe == Wipe::All)
            .map_err(|e| Error::io(format!("zero {} ({ns_name})", node.display()), e))
    }

    /// Unbinds and detaches the claim and binds the namespace raw with
    /// `force_raw`, so its info block is not probed; returns the raw node.
    fn to_raw(&self, info: &RegionInfo, ns_name: &str) -> Result<PathBuf> {
        let t = self.tree();
        let ns = t.namespace(ns_name)?;
        let what = format!("namespace {ns_name} ({:?}) in {}", ns.alt_name, info.name);
        if let Some(h) = &ns.holder {
            let c = t.claim(h)?;
            if c.bound {
                if let Some(b) = t.block(h)? {
                    let node = self
                        .devs
                        .node(&b.name, b.major, b.minor)
                        .map_err(|e| Error::io(format!("device node of {}", b.name), e))?;
                    self.refuse_busy(&node, &what)?;
                }
                self.unbind(h)?;
            }
            self.write(h, "namespace", "")?;
            self.write(ns_name, "holder_class", "")?;
        }
        let ns = t.namespace(ns_name)?;
        if ns.driver.is_none() {
            self.write(ns_name, "force_raw", "1")?;
            self.bind(ns_name)?;
        }
        let (_, node) = self.wait_block(ns_name)?;
        self.refuse_busy(&node, &what)?;
        Ok(node)
    }

    /// Unbinds a raw namespace and frees its space (`size` 0 deletes it).
    fn delete(&self, ns_name: &str) -> Result<()> {
        let ns = self.tree().namespace(ns_name)?;
        if ns.force_raw {
            self.write(ns_name, "force_raw", "0")?;
        }
        if ns.driver.is_some() {
            self.unbind(ns_name)?;
        }
        self.write(ns_name, "size", "0")?;
        Ok(())
    }

    fn destroy_ns(&self, info: &RegionInfo, ns_name: &str) -> Result<()> {
        let t0 = Instant::now();
        self.teardown(info, ns_name, Wipe::Info)?;
        self.delete(ns_name)?;
        tracing::info!(region = %info.name, namespace = ns_name, ms = t0.elapsed().as_millis() as u64, "destroyed namespace");
        Ok(())
    }

    /// Takes the claim off a deleted volume's namespace, wipes its info
    /// block and renames it to the erasing marker, leaving it bound raw.
    /// Refuses a busy device before changing anything.
    fn retire_ns(&self, info: &RegionInfo, ns_name: &str, volume_id: &str) -> Result<()> {
        let node = self.to_raw(info, ns_name)?;
        let ns = self.tree().namespace(ns_name)?;
        self.devs
            .zero(&node, 0, INFO_WIPE.min(ns.size), false)
            .map_err(|e| Error::io(format!("zero {} ({ns_name})", node.display()), e))?;
        // alt_name is writable only while the namespace is unbound.
        self.unbind(ns_name)?;
        self.write(
            ns_name,
            "alt_name",
            &marker_with(&erasing_prefix(&self.cfg.marker), volume_id)?,
        )?;
        self.bind(ns_name)?;
        tracing::info!(region = %info.name, namespace = ns_name, volume = volume_id, "namespace retired for erasing");
        Ok(())
    }

    /// The raw device node of an erasing namespace, binding it raw first
    /// (after a crash or reboot it may be unbound).
    fn erasing_node(&self, ns_name: &str, volume_id: &str) -> Result<PathBuf> {
        let ns = self.tree().namespace(ns_name)?;
        if ns.driver.is_none() {
            if !ns.force_raw {
                self.write(ns_name, "force_raw", "1")?;
            }
            self.bind(ns_name)?;
        }
        let (_, node) = self.wait_block(ns_name)?;
        self.refuse_busy(&node, &format!("deleted volume {volume_id} (erasing)"))?;
        Ok(node)
    }

    fn describe_region(&self, info: &RegionInfo) -> String {
        let state = match Self::refusal(info) {
            Some(_) if info.nstype == NSTYPE_IO => "label-less, not usable for volumes".to_owned(),
            Some(_) if !info.enabled => "disabled".to_owned(),
            Some(_) if info.read_only => "read-only".to_owned(),
            Some(_) => format!("nstype {}, not usable", info.nstype),
            None => format!("labeled, align {}", Bytes(info.align)),
        };
        format!(
            "{} ({}, {}, {}, numa {}, persistence {})",
            info.name,
            Bytes(info.size),
            state,
            info.dimms().join("+"),
            info.numa_node,
            info.persistence_domain.as_deref().unwrap_or("unknown")
        )
    }
}

impl Backend for DirectBackend {
    fn kind(&self) -> &'static str {
        "direct"
    }

    fn describe(&self) -> String {
        let regions: Vec<String> = self
            .regions
            .iter()
            .map(|s| match self.region_info(&s.name) {
                Ok(i) => self.describe_region(&i),
                Err(e) => format!("{} (unreadable: {e})", s.name),
            })
            .collect();
        format!(
            "direct backend: one libnvdimm namespace per volume through {}; regions: {}",
            self.sys.display(DEVICES),
            if regions.is_empty() {
                "none (this node serves no capacity)".to_owned()
            } else {
                regions.join("; ")
            }
        )
    }

    fn regions(&self) -> Result<Vec<RegionSpec>> {
        self.regions
            .iter()
            .map(|s| self.spec_of(&self.region_info(&s.name)?))
            .collect()
    }

    fn extent_for(&self, region: &RegionSpec, usable: Bytes, usage: Usage) -> Bytes {
        Bytes(layout::extent_for(usable.0, usage, region.align.0))
    }

    fn usable_for(&self, _region: &RegionSpec, extent: Bytes, usage: Usage) -> Bytes {
        Bytes(layout::usable(extent.0, usage))
    }

    fn placement(&self) -> Placement {
        Placement::FirstFit
    }

    fn reserved(&self) -> Result<Vec<Allocated>> {
        let mut out = Vec::new();
        for s in &self.regions {
            let info = self.region_info(&s.name)?;
            for ns in self.tree().namespaces(&s.name)? {
                if ns.size == 0 {
                    continue;
                }
                let off = if ns.io { Some(0) } else { ns.offset(&info) };
                if let Some(off) = off {
                    out.push(Allocated {
                        region: s.name.clone(),
                        offset: Bytes(off),
                        len: Bytes(ns.size),
                        volume: self.volume_of(&ns.alt_name).map(str::to_owned),
                        device: ns.name.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn unusable_reason(&self, region: &str) -> Option<String> {
        match self.region_info(region) {
            Ok(info) => Self::refusal(&info),
            Err(e) => Some(format!("region {region} cannot be read: {e}")),
        }
    }

    fn can_resize(&self) -> bool {
        false
    }

    fn check_resize(&self, req: &DeviceRequest, new_size: Bytes) -> Result<()> {
        Err(Error::FailedPrecondition(format!(
            "volume {} cannot grow to {new_size}: the direct backend cannot resize a namespace in place (libnvdimm resizes only disabled namespaces, and the fsdax/sector metadata would not follow); create a larger volume and copy the data",
            req.volume_id
        )))
    }

    fn begin_create(&self, req: &DeviceRequest) -> Result<()> {
        relock(&self.fresh).insert(req.volume_id.clone(), (req.region.clone(), req.offset.0));
        Ok(())
    }

    fn check_idle(&self, req: &DeviceRequest) -> Result<()> {
        let info = self.region_info(&req.region)?;
        let Some(ns) = self.ours(&info, &req.volume_id)? else {
            return Ok(());
        };
        let what = format!("volume {}", req.volume_id);
        let dev = match self.state(&ns, claim_kind(req.usage))? {
            NsState::Active { claim, .. } => claim,
            NsState::Raw => ns.name.clone(),
            _ => return Ok(()),
        };
        if let Some(b) = self.tree().block(&dev)? {
            let node = self
                .devs
                .node(&b.name, b.major, b.minor)
                .map_err(|e| Error::io(format!("device node of {}", b.name), e))?;
            self.refuse_busy(&node, &what)?;
        }
        Ok(())
    }

    fn create(&self, req: &DeviceRequest) -> Result<Device> {
        let t0 = Instant::now();
        let slot = self.slot(&req.region)?;
        let info = self.region_info(&req.region)?;
        if let Some(why) = Self::refusal(&info) {
            return Err(Error::FailedPrecondition(why));
        }
        let fresh = self.is_fresh(&req.volume_id);
        if !fresh && self.ours(&info, &req.volume_id)?.is_none() {
            return Err(Self::gone(&info, req));
        }
        let result = self
            .await_placement(slot, req)
            .and_then(|_guard| self.create_locked(&info, req, fresh));
        slot.changed.notify_all();
        relock(&self.fresh).remove(&req.volume_id);
        if let Ok(d) = &result {
            tracing::info!(volume = %req.volume_id, region = %req.region, device = ?d.path, ms = t0.elapsed().as_millis() as u64, "namespace ready");
        }
        result
    }

    fn find(&self, req: &DeviceRequest) -> Result<Option<Device>> {
        let info = self.region_info(&req.region)?;
        let Some(ns) = self.ours(&info, &req.volume_id)? else {
            return Ok(None);
        };
        Self::check_extent(&info, &ns, req)?;
        match self.state(&ns, claim_kind(req.usage))? {
            NsState::Active { block, .. } => {
                let node = self
                    .devs
                    .node(&block.name, block.major, block.minor)
                    .map_err(|e| Error::io(format!("device node of {}", block.name), e))?;
                Ok(Some(Device {
                    path: Some(node.display().to_string()),
                    size: Bytes(block.bytes),
                }))
            }
            _ => Ok(None),
        }
    }

    fn destroy(&self, req: &DeviceRequest) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let result = (|| {
            let _g = relock(&slot.lock);
            let info = self.region_info(&req.region)?;
            let ns = match self.ours(&info, &req.volume_id)? {
                Some(ns) => ns,
                None => match self.erasing(&info, &req.volume_id)? {
                    Some(ns) => ns,
                    None => return Ok(()),
                },
            };
            if Self::check_extent(&info, &ns, req).is_err() {
                tracing::warn!(volume = %req.volume_id, namespace = %ns.name, "removing our namespace although it is not at the ledger's extent");
            }
            self.destroy_ns(&info, &ns.name)
        })();
        slot.changed.notify_all();
        relock(&self.fresh).remove(&req.volume_id);
        result
    }

    fn retire(&self, req: &DeviceRequest) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let result = (|| {
            let _g = relock(&slot.lock);
            let info = self.region_info(&req.region)?;
            let Some(ns) = self.ours(&info, &req.volume_id)? else {
                // Retired before (or never made): nothing of the tenant's left.
                return Ok(());
            };
            if Self::check_extent(&info, &ns, req).is_err() {
                tracing::warn!(volume = %req.volume_id, namespace = %ns.name, "retiring our namespace although it is not at the ledger's extent");
            }
            self.retire_ns(&info, &ns.name, &req.volume_id)
        })();
        relock(&self.fresh).remove(&req.volume_id);
        result
    }

    fn erase(&self, req: &DeviceRequest, progress: Progress<'_>) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let (ns, node) = {
            let _g = relock(&slot.lock);
            let info = self.region_info(&req.region)?;
            if let Some(ns) = self.ours(&info, &req.volume_id)? {
                self.retire_ns(&info, &ns.name, &req.volume_id)?;
            }
            let Some(ns) = self.erasing(&info, &req.volume_id)? else {
                // Destroyed already (a crash between destroy and the ledger).
                tracing::debug!(volume = %req.volume_id, "no namespace left to erase");
                return Ok(());
            };
            let node = self.erasing_node(&ns.name, &req.volume_id)?;
            (ns, node)
        };
        // Zeroing takes long; the namespace is the eraser's alone (nothing
        // else touches an erasing marker), so the region stays unlocked.
        let t0 = Instant::now();
        let mut done = 0u64;
        while done < ns.size {
            let n = (ns.size - done).min(ERASE_CHUNK);
            self.devs
                .zero(&node, done, n, true)
                .map_err(|e| Error::io(format!("erase {} ({})", node.display(), ns.name), e))?;
            done += n;
            progress(n)?;
        }
        tracing::info!(volume = %req.volume_id, namespace = %ns.name, bytes = ns.size, ms = t0.elapsed().as_millis() as u64, "erased namespace");
        Ok(())
    }

    fn resize(&self, req: &DeviceRequest) -> Result<Device> {
        match self.find(req)? {
            Some(d) => Ok(d),
            None => self.create(req),
        }
    }

    fn inventory(&self) -> Result<Vec<InventoryItem>> {
        let mut out = Vec::new();
        for s in &self.regions {
            let info = self.region_info(&s.name)?;
            for ns in self.tree().namespaces(&s.name)? {
                // Our identity namespace is neither a volume nor foreign.
                if ns.size == 0 || (!ns.io && ns.alt_name.starts_with(IDENTITY_PREFIX)) {
                    continue;
                }
                let owner = match self.volume_of(&ns.alt_name) {
                    Some(id) if !ns.io => Owner::Ours(id.to_owned()),
                    _ if ns.io => Owner::Foreign(format!(
                        "label-less namespace {} covering all of {} (mode {})",
                        ns.name, s.name, ns.mode
                    )),
                    _ => Owner::Foreign(format!(
                        "namespace {} named {:?} (mode {}, {})",
                        ns.name,
                        ns.alt_name,
                        ns.mode,
                        Bytes(ns.size)
                    )),
                };
                out.push(InventoryItem {
                    region: s.name.clone(),
                    path: ns.name.clone(),
                    offset: Bytes(if ns.io { Some(0) } else { ns.offset(&info) }.unwrap_or(0)),
                    size: Bytes(ns.size),
                    owner,
                });
            }
        }
        Ok(out)
    }

    fn is_retired(&self, item: &InventoryItem) -> bool {
        self.tree()
            .namespace(&item.path)
            .is_ok_and(|ns| ns.alt_name.starts_with(&erasing_prefix(&self.cfg.marker)))
    }

    fn remove_orphan(&self, item: &InventoryItem) -> Result<()> {
        let Owner::Ours(id) = &item.owner else {
            return Err(Error::FailedPrecondition(format!(
                "refusing to remove foreign namespace {}",
                item.path
            )));
        };
        let slot = self.slot(&item.region)?;
        let result = (|| {
            let _g = relock(&slot.lock);
            let info = self.region_info(&item.region)?;
            let ns = self.tree().namespace(&item.path)?;
            // The name may have been reused since the inventory.
            if self.volume_of(&ns.alt_name) != Some(id.as_str()) || ns.size == 0 {
                return Err(Error::FailedPrecondition(format!(
                    "namespace {} changed since the inventory (now {:?}); not removing it",
                    item.path, ns.alt_name
                )));
            }
            // It may hold a tenant's data: zero all of it before the space is free.
            self.teardown(&info, &item.path, Wipe::All)?;
            self.delete(&item.path)
        })();
        slot.changed.notify_all();
        result
    }

    fn region_stamp(&self, region: &str) -> Result<RegionStamp> {
        let info = self.region_info(region)?;
        if !self.cfg.identity || Self::refusal(&info).is_some() {
            // Label-less or unusable: holds no volume, keeps no identity.
            return Ok(RegionStamp::Unsupported);
        }
        let ids = self.identity_namespaces(region)?;
        let names: Vec<&str> = ids
            .iter()
            .filter_map(|n| n.alt_name.strip_prefix(IDENTITY_PREFIX))
            .collect();
        Ok(match names.as_slice() {
            [] => RegionStamp::Unstamped,
            [one] => RegionStamp::Stamped((*one).to_owned()),
            many => {
                RegionStamp::Stamped(format!("several identity namespaces: {}", many.join(", ")))
            }
        })
    }

    fn stamp_region(&self, region: &str, ledger_id: &str) -> Result<()> {
        let slot = self.slot(region)?;
        let _g = relock(&slot.lock);
        let info = self.region_info(region)?;
        if let Some(why) = Self::refusal(&info) {
            return Err(Error::FailedPrecondition(why));
        }
        let ids = self.identity_namespaces(region)?;
        let want = format!("{IDENTITY_PREFIX}{ledger_id}");
        if ids.iter().any(|n| n.alt_name == want) {
            return Ok(());
        }
        if let Some(other) = ids.first() {
            return Err(Error::FailedPrecondition(format!(
                "region {region} already has the identity namespace {} ({:?}) of another ledger",
                other.name, other.alt_name
            )));
        }
        let r = self.make_identity(&info, ledger_id);
        slot.changed.notify_all();
        r
    }

    fn reinit_region(&self, region: &str, ledger_id: &str) -> Result<Vec<String>> {
        let slot = self.slot(region)?;
        let mut lines = Vec::new();
        {
            let _g = relock(&slot.lock);
            let info = self.region_info(region)?;
            for ns in self.tree().namespaces(region)? {
                if ns.size == 0 || ns.io {
                    continue;
                }
                if let Some(id) = marked_volume(&self.cfg.marker, &ns.alt_name) {
                    // Our volume: every byte zeroed before the space is freed.
                    self.teardown(&info, &ns.name, Wipe::All)?;
                    self.delete(&ns.name)?;
                    lines.push(format!(
                        "erased and removed namespace {} (volume {id})",
                        ns.name
                    ));
                } else if ns.alt_name.starts_with(IDENTITY_PREFIX)
                    && ns.alt_name != format!("{IDENTITY_PREFIX}{ledger_id}")
                {
                    self.delete(&ns.name)?;
                    lines.push(format!(
                        "removed identity namespace {} ({:?})",
                        ns.name, ns.alt_name
                    ));
                }
            }
        }
        slot.changed.notify_all();
        self.stamp_region(region, ledger_id)?;
        lines.push(format!("stamped {region} for ledger {ledger_id}"));
        Ok(lines)
    }

    fn set_ledger_id(&self, ledger_id: &str) {
        if !self.cfg.identity {
            return;
        }
        let short: String = ledger_id.chars().take(8).collect();
        *relock(&self.ledger_short) =
            (short.len() == 8 && short.bytes().all(|b| b.is_ascii_hexdigit())).then_some(short);
    }

    fn recovered_usage(&self, item: &InventoryItem) -> Usage {
        let sector = self
            .tree()
            .namespace(&item.path)
            .ok()
            .and_then(|ns| ns.holder)
            .and_then(|h| self.tree().claim(&h).ok())
            .is_some_and(|c| c.kind == ClaimKind::Btt);
        if sector {
            Usage::FileIo
        } else {
            Usage::AppDirect
        }
    }
}

#[cfg(test)]
mod tests;

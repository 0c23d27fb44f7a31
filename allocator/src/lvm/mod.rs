//! The `lvm` backend: one volume group per region on physical volumes of
//! our own (fsdax namespaces, see [`pvs`]), one logical volume per volume.
//!
//! Design points:
//! - **Names and tags.** The volume group of region `R` is `<prefix>R`,
//!   tagged [`TAG`]; a volume's LV is named by its volume id and tagged
//!   [`TAG`]. An untagged LV in our group is foreign: reported, never
//!   touched. A group of that name without our tag is refused at start.
//! - **Sizes.** The region is the group's extents (`vg_extent_count` ×
//!   `vg_extent_size`, 4 MiB); a volume needs free extents, not a
//!   contiguous hole ([`Placement::Pooled`]). Physical volumes get a 2 MiB
//!   data alignment so every extent, and the filesystem on an LV, is
//!   huge-page aligned; `pe_start` is checked.
//! - **Reports.** State comes from one `lvm fullreport` in JSON, cached
//!   until the next change: one report per change, not one per call.
//! - **Erase.** `lvcreate` does not zero (`--zero n`): extents are zeroed
//!   when a volume is deleted; at create only the first MiB is wiped (no
//!   stale filesystem signature on extents reused unerased). `retire` renames the LV to
//!   `erasing-<volume id>` (the tenant's device path is gone; the LV keeps
//!   its extents, so `lvcreate` cannot hand them out); `erase` overwrites
//!   and verifies it in chunks, through the LV when it is active, else
//!   (metadata-only mode) through the PV ranges the report gives; `destroy`
//!   is `lvremove`.
//! - **Metadata-only mode** (`--driverloaded n`): no device-mapper, so LVs
//!   are never active and have no device node. For hosts without
//!   device-mapper and for tests of command construction, parsing and
//!   reconciliation on loop devices.
//! - **Locking.** A mutex per volume group around every change.

pub mod command;
pub mod pvs;
pub mod report;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{
    Allocated, Backend, Device, DeviceRequest, InventoryItem, Owner, Placement, Progress,
    RegionStamp,
};
use crate::direct::sysfs::{BlockDevices, RealBlockDevices};
use crate::error::{Error, Result};
use crate::region::RegionSpec;
use crate::units::{Bytes, MIB};
use command::LvmRunner;
use pvs::PvSource;
use report::{Lv, REPORT_ARGS, Snapshot, Vg};

/// Tag on our volume groups and logical volumes.
pub const TAG: &str = "pmem-agent";
/// Prefix of the volume group tag that carries the ledger's identity
/// (`pmem-agent-ledger.<32 hex>`, identity.rs).
pub const LEDGER_TAG_PREFIX: &str = "pmem-agent-ledger.";
/// Extent size of our volume groups.
pub const EXTENT: u64 = 4 * MIB;
/// Data alignment of our physical volumes: huge-page aligned extents.
pub const DATA_ALIGN: u64 = 2 * MIB;
/// Bytes an erase zeroes (and verifies) per step.
const ERASE_CHUNK: u64 = 64 * MIB;
/// Name prefix of a deleted volume's LV while it is erased.
pub const ERASING_PREFIX: &str = "erasing-";

#[derive(Debug, Clone)]
pub struct LvmConfig {
    /// Volume group name = prefix + region id.
    pub vg_prefix: String,
    /// LVs are never activated (no device-mapper): see the module doc.
    pub metadata_only: bool,
}

impl Default for LvmConfig {
    fn default() -> LvmConfig {
        LvmConfig {
            vg_prefix: "pmem-".to_owned(),
            metadata_only: false,
        }
    }
}

#[derive(Debug)]
struct VgSlot {
    region: String,
    vg: String,
    numa_node: i32,
    lock: Mutex<()>,
}

#[derive(Debug)]
pub struct LvmBackend {
    lvm: Arc<dyn LvmRunner>,
    devs: Arc<dyn BlockDevices>,
    cfg: LvmConfig,
    slots: Vec<VgSlot>,
    cache: Mutex<Option<Arc<Snapshot>>>,
    /// Volumes being created (begin_create was called): only their LVs may
    /// be made; a ready volume whose LV vanished is not made anew, empty.
    fresh: Mutex<HashSet<String>>,
    source: String,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bytes_arg(b: Bytes) -> String {
    format!("{}b", b.0)
}

impl LvmBackend {
    /// Prepares the physical volumes and volume groups and activates them.
    pub fn open(
        lvm: Arc<dyn LvmRunner>,
        source: &dyn PvSource,
        cfg: LvmConfig,
    ) -> Result<LvmBackend> {
        let regions = source.prepare()?;
        let b = LvmBackend {
            lvm,
            devs: Arc::new(RealBlockDevices::new("/dev")),
            slots: regions
                .iter()
                .map(|r| VgSlot {
                    region: r.region.clone(),
                    vg: format!("{}{}", cfg.vg_prefix, r.region),
                    numa_node: r.numa_node,
                    lock: Mutex::new(()),
                })
                .collect(),
            cfg,
            cache: Mutex::new(None),
            fresh: Mutex::new(HashSet::new()),
            source: source.describe(),
        };
        for (r, slot) in regions.iter().zip(&b.slots) {
            b.ensure_vg(slot, &r.devices)?;
        }
        Ok(b)
    }

    /// How many lvm commands ran so far.
    pub fn invocations(&self) -> u64 {
        self.lvm.invocations()
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>> {
        if let Some(s) = relock(&self.cache).as_ref() {
            return Ok(s.clone());
        }
        let out = self.lvm.run("fullreport", REPORT_ARGS)?;
        let snap = Arc::new(report::parse(&out)?);
        *relock(&self.cache) = Some(snap.clone());
        Ok(snap)
    }

    /// Runs a command that changes LVM state; the cached report is stale
    /// afterwards, whether it worked or not.
    fn change(&self, sub: &str, args: &[&str]) -> Result<()> {
        let r = self.lvm.run(sub, args);
        *relock(&self.cache) = None;
        r.map(|_| ())
    }

    fn slot(&self, region: &str) -> Result<&VgSlot> {
        self.slots
            .iter()
            .find(|s| s.region == region)
            .ok_or_else(|| Error::NotFound(format!("region {region} has no volume group")))
    }

    fn vg<'a>(snap: &'a Snapshot, slot: &VgSlot) -> Result<&'a Vg> {
        snap.vg(&slot.vg).ok_or_else(|| {
            Error::Device(format!(
                "volume group {} of region {} is gone; check pvs/vgs",
                slot.vg, slot.region
            ))
        })
    }

    /// Makes every device a PV of the slot's group and the group exist.
    fn ensure_vg(&self, slot: &VgSlot, devices: &[String]) -> Result<()> {
        let _g = relock(&slot.lock);
        let snap = self.snapshot()?;
        if let Some(vg) = snap.vg(&slot.vg)
            && !vg.tags.iter().any(|t| t == TAG)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume group {} of region {} exists but is not ours (no tag {TAG}); rename it or set another volume group prefix",
                slot.vg, slot.region
            )));
        }
        let mut new = Vec::new();
        for d in devices {
            match snap.pv(d) {
                Some(pv) if pv.vg == slot.vg => {}
                Some(pv) if !pv.vg.is_empty() => {
                    return Err(Error::FailedPrecondition(format!(
                        "physical volume {d} of region {} belongs to volume group {}, not {}; leaving it alone",
                        slot.region, pv.vg, slot.vg
                    )));
                }
                Some(_) => new.push(d.as_str()),
                None => {
                    let align = bytes_arg(Bytes(DATA_ALIGN));
                    self.change("pvcreate", &["--dataalignment", &align, d])?;
                    new.push(d.as_str());
                }
            }
        }
        if !new.is_empty() {
            if snap.vg(&slot.vg).is_some() {
                tracing::info!(vg = %slot.vg, devices = ?new, "extending volume group");
                self.change("vgextend", &[&[slot.vg.as_str()], new.as_slice()].concat())?;
            } else {
                tracing::info!(vg = %slot.vg, devices = ?new, "creating volume group");
                let ext = bytes_arg(Bytes(EXTENT));
                let args = [
                    &["--addtag", TAG, "--physicalextentsize", &ext, &slot.vg][..],
                    &new,
                ]
                .concat();
                self.change("vgcreate", &args)?;
            }
        }
        let snap = self.snapshot()?;
        let vg = Self::vg(&snap, slot)?;
        for pv in &vg.pvs {
            if pv.pe_start % DATA_ALIGN != 0 {
                return Err(Error::FailedPrecondition(format!(
                    "physical volume {} of volume group {} starts its data at {} bytes, not a multiple of 2 MiB: extents would not be huge-page aligned; recreate it with pvcreate --dataalignment 2m",
                    pv.name, vg.name, pv.pe_start
                )));
            }
        }
        if vg.extent_size != EXTENT {
            tracing::warn!(vg = %vg.name, extent = vg.extent_size, "volume group extent size is not 4 MiB");
        }
        if !self.cfg.metadata_only {
            self.change("vgchange", &["--activate", "y", &slot.vg])?;
        }
        Ok(())
    }

    fn ours(lv: &Lv) -> bool {
        lv.tags.iter().any(|t| t == TAG)
    }

    /// Our LV of a volume, if there is one.
    fn lv_of(&self, slot: &VgSlot, volume_id: &str) -> Result<Option<Lv>> {
        self.lv_named(slot, volume_id)
    }

    /// A deleted volume's LV under its erasing name, if there is one.
    fn retired_of(&self, slot: &VgSlot, volume_id: &str) -> Result<Option<Lv>> {
        self.lv_named(slot, &format!("{ERASING_PREFIX}{volume_id}"))
    }

    /// The volume an LV of ours belongs to (live or erasing).
    fn volume_of(lv: &Lv) -> &str {
        lv.name.strip_prefix(ERASING_PREFIX).unwrap_or(&lv.name)
    }

    fn lv_named(&self, slot: &VgSlot, name: &str) -> Result<Option<Lv>> {
        let snap = self.snapshot()?;
        let vg = Self::vg(&snap, slot)?;
        match vg.lv(name) {
            Some(lv) if Self::ours(lv) => Ok(Some(lv.clone())),
            Some(_) => Err(Error::Device(format!(
                "logical volume {}/{name} exists without our tag {TAG}; not using it",
                slot.vg
            ))),
            None => Ok(None),
        }
    }

    fn device_of(&self, slot: &VgSlot, lv: &Lv) -> Result<Device> {
        if self.cfg.metadata_only {
            return Ok(Device {
                path: None,
                size: Bytes(lv.size),
            });
        }
        let full = format!("{}/{}", slot.vg, lv.name);
        if !lv.active {
            self.change("lvchange", &["--activate", "y", &full])?;
        }
        if !Path::new(&lv.path).exists() {
            return Err(Error::Device(format!(
                "logical volume {full} is active but {} does not exist (udev rules missing? set activation/udev_rules=0 in the lvm config overrides when udevd is absent)",
                lv.path
            )));
        }
        Ok(Device {
            path: Some(lv.path.clone()),
            size: Bytes(lv.size),
        })
    }

    /// Where an LV's bytes are, in order: (device, byte offset, length).
    /// Its own device when active, else (metadata-only mode) the PV ranges.
    fn segments(&self, slot: &VgSlot, lv: &Lv) -> Result<Vec<(String, u64, u64)>> {
        let what = format!("logical volume {}/{}", slot.vg, lv.name);
        if !self.cfg.metadata_only {
            return Ok(vec![(lv.path.clone(), 0, lv.size)]);
        }
        let snap = self.snapshot()?;
        let vg = Self::vg(&snap, slot)?;
        let mut out = Vec::new();
        let mut left = lv.size;
        for (dev, first, count) in &lv.ranges {
            if left == 0 {
                break;
            }
            let pv = vg.pvs.iter().find(|p| &p.name == dev).ok_or_else(|| {
                Error::Device(format!(
                    "{what} maps to {dev}, which is not a PV of {}",
                    vg.name
                ))
            })?;
            let n = (count * vg.extent_size).min(left);
            out.push((dev.clone(), pv.pe_start + first * vg.extent_size, n));
            left -= n;
        }
        if left > 0 {
            return Err(Error::Device(format!(
                "{what} maps fewer bytes than its size {}",
                lv.size
            )));
        }
        Ok(out)
    }

    /// Zeroes and verifies all of an LV, in chunks reported to `progress`.
    fn zero_all(&self, slot: &VgSlot, lv: &Lv, progress: Progress<'_>) -> Result<()> {
        let what = format!("logical volume {}/{}", slot.vg, lv.name);
        for (dev, start, len) in self.segments(slot, lv)? {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(ERASE_CHUNK);
                self.devs
                    .zero(Path::new(&dev), start + done, n, true)
                    .map_err(|e| Error::io(format!("erase {what} on {dev}"), e))?;
                done += n;
                progress(n)?;
            }
        }
        Ok(())
    }

    /// Zeroes the first MiB of a new LV. Extents reused without an erase
    /// (`eraseAfter=false` with `--allow-unerased-reuse`) still hold the
    /// previous volume's filesystem signature, which NodeStage would mount
    /// instead of formatting (a grown xfs on a smaller LV fails with EIO).
    fn wipe_head(&self, slot: &VgSlot, lv: &Lv) -> Result<()> {
        let what = format!("logical volume {}/{}", slot.vg, lv.name);
        let mut left = MIB.min(lv.size);
        for (dev, start, len) in self.segments(slot, lv)? {
            if left == 0 {
                break;
            }
            let n = len.min(left);
            self.devs
                .zero(Path::new(&dev), start, n, false)
                .map_err(|e| Error::io(format!("wipe the head of {what} on {dev}"), e))?;
            left -= n;
        }
        Ok(())
    }

    /// Activates an LV when LVs can be active at all and it is not.
    fn activate(&self, slot: &VgSlot, lv: &Lv) -> Result<()> {
        if !self.cfg.metadata_only && !lv.active {
            self.change(
                "lvchange",
                &["--activate", "y", &format!("{}/{}", slot.vg, lv.name)],
            )?;
        }
        Ok(())
    }

    fn refuse_busy(&self, lv: &Lv, volume_id: &str) -> Result<()> {
        if self.cfg.metadata_only || !lv.active {
            return Ok(());
        }
        let busy = self
            .devs
            .is_busy(Path::new(&lv.path))
            .map_err(|e| Error::io(format!("check {} of volume {volume_id}", lv.path), e))?;
        if busy {
            return Err(Error::FailedPrecondition(format!(
                "device {} of volume {volume_id} is in use (mounted or open exclusively)",
                lv.path
            )));
        }
        Ok(())
    }

    fn remove(&self, slot: &VgSlot, lv: &Lv, volume_id: &str) -> Result<()> {
        self.refuse_busy(lv, volume_id)?;
        // An LV held open (not exclusively) passes the O_EXCL check; lvm
        // refuses it before changing anything, which is the client's
        // precondition, not an internal error (the delete is undone).
        self.change("lvremove", &["--yes", &format!("{}/{}", slot.vg, lv.name)])
            .map_err(|e| in_use(e, lv, volume_id))
    }
}

/// An lvm refusal because the LV is open, as the precondition it is.
fn in_use(e: Error, lv: &Lv, volume_id: &str) -> Error {
    match e {
        Error::Device(m) if m.contains(" in use") => Error::FailedPrecondition(format!(
            "device {} of volume {volume_id} is in use (open by another process): {m}",
            lv.path
        )),
        e => e,
    }
}

impl Backend for LvmBackend {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn describe(&self) -> String {
        format!(
            "lvm backend: volume groups {} on {}{}",
            self.slots
                .iter()
                .map(|s| s.vg.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.source,
            if self.cfg.metadata_only {
                "; metadata-only mode (no device-mapper): logical volumes are never activated"
            } else {
                ""
            }
        )
    }

    fn regions(&self) -> Result<Vec<RegionSpec>> {
        let snap = self.snapshot()?;
        self.slots
            .iter()
            .map(|s| {
                let vg = Self::vg(&snap, s)?;
                Ok(RegionSpec {
                    id: s.region.clone(),
                    size: Bytes(vg.extent_count * vg.extent_size),
                    align: Bytes(vg.extent_size),
                    // LVM has no per-group limit worth counting.
                    ns_slots: u32::MAX,
                    numa_node: s.numa_node,
                    location: format!("volume group {}", vg.name),
                })
            })
            .collect()
    }

    fn placement(&self) -> Placement {
        Placement::Pooled
    }

    fn reserved(&self) -> Result<Vec<Allocated>> {
        let snap = self.snapshot()?;
        let mut out = Vec::new();
        for s in &self.slots {
            for lv in &Self::vg(&snap, s)?.lvs {
                out.push(Allocated {
                    region: s.region.clone(),
                    offset: Bytes::ZERO,
                    len: Bytes(lv.size),
                    volume: Self::ours(lv).then(|| Self::volume_of(lv).to_owned()),
                    device: format!("{}/{}", s.vg, lv.name),
                });
            }
        }
        Ok(out)
    }

    fn refresh(&self) {
        *relock(&self.cache) = None;
    }

    fn begin_create(&self, req: &DeviceRequest) -> Result<()> {
        relock(&self.fresh).insert(req.volume_id.clone());
        Ok(())
    }

    fn check_idle(&self, req: &DeviceRequest) -> Result<()> {
        let slot = self.slot(&req.region)?;
        match self.lv_of(slot, &req.volume_id)? {
            Some(lv) => self.refuse_busy(&lv, &req.volume_id),
            None => Ok(()),
        }
    }

    fn create(&self, req: &DeviceRequest) -> Result<Device> {
        let slot = self.slot(&req.region)?;
        let _g = relock(&slot.lock);
        let fresh = relock(&self.fresh).remove(&req.volume_id);
        let lv = match self.lv_of(slot, &req.volume_id)? {
            Some(lv) => lv,
            None if !fresh => {
                return Err(Error::Device(format!(
                    "logical volume {}/{} of volume {} is gone; its data cannot be restored (check lvs -a; a vgcfgrestore may bring it back)",
                    slot.vg, req.volume_id, req.volume_id
                )));
            }
            None => {
                let mut args = vec![
                    "--name",
                    req.volume_id.as_str(),
                    "--addtag",
                    TAG,
                    "--zero",
                    "n",
                    "--wipesignatures",
                    "n",
                    "--yes",
                ];
                if self.cfg.metadata_only {
                    args.extend(["--activate", "n"]);
                }
                let size = bytes_arg(req.size);
                args.extend(["--size", &size, &slot.vg]);
                self.change("lvcreate", &args)?;
                let lv = self.lv_of(slot, &req.volume_id)?.ok_or_else(|| {
                    Error::Device(format!(
                        "lvcreate of {}/{} succeeded but the report does not show it",
                        slot.vg, req.volume_id
                    ))
                })?;
                self.wipe_head(slot, &lv)?;
                lv
            }
        };
        if lv.size < req.size.0 {
            return Err(Error::Device(format!(
                "logical volume {}/{} has {} bytes, the ledger expects {}",
                slot.vg, lv.name, lv.size, req.size
            )));
        }
        self.device_of(slot, &lv)
    }

    fn find(&self, req: &DeviceRequest) -> Result<Option<Device>> {
        let slot = self.slot(&req.region)?;
        match self.lv_of(slot, &req.volume_id)? {
            Some(lv) => self.device_of(slot, &lv).map(Some),
            None => Ok(None),
        }
    }

    fn destroy(&self, req: &DeviceRequest) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let _g = relock(&slot.lock);
        relock(&self.fresh).remove(&req.volume_id);
        if let Some(lv) = self.lv_of(slot, &req.volume_id)? {
            self.remove(slot, &lv, &req.volume_id)?;
        }
        match self.retired_of(slot, &req.volume_id)? {
            Some(lv) => self.remove(slot, &lv, &req.volume_id),
            None => Ok(()),
        }
    }

    fn retire(&self, req: &DeviceRequest) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let _g = relock(&slot.lock);
        relock(&self.fresh).remove(&req.volume_id);
        let Some(lv) = self.lv_of(slot, &req.volume_id)? else {
            return Ok(());
        };
        self.refuse_busy(&lv, &req.volume_id)?;
        if !self.cfg.metadata_only && lv.active {
            // Deactivating fails while anyone has the device open, so no
            // descriptor of the tenant's survives to write behind the erase
            // (O_EXCL only sees mounts and exclusive holders).
            let full = format!("{}/{}", slot.vg, lv.name);
            self.change("lvchange", &["--activate", "n", &full])
                .map_err(|e| in_use(e, &lv, &req.volume_id))?;
        }
        // The LV keeps its extents; only its name (and device path) goes.
        self.change(
            "lvrename",
            &[
                slot.vg.as_str(),
                lv.name.as_str(),
                &format!("{ERASING_PREFIX}{}", req.volume_id),
            ],
        )?;
        tracing::info!(vg = %slot.vg, volume = %req.volume_id, "logical volume retired for erasing");
        Ok(())
    }

    fn erase(&self, req: &DeviceRequest, progress: Progress<'_>) -> Result<()> {
        let slot = self.slot(&req.region)?;
        let lv = {
            let _g = relock(&slot.lock);
            let Some(lv) = self.retired_of(slot, &req.volume_id)? else {
                if self.lv_of(slot, &req.volume_id)?.is_some() {
                    return Err(Error::Device(format!(
                        "logical volume {}/{} of deleted volume {} was not retired; retry the delete",
                        slot.vg, req.volume_id, req.volume_id
                    )));
                }
                // Removed already (a crash between lvremove and the ledger).
                return Ok(());
            };
            self.activate(slot, &lv)?;
            let lv = self.retired_of(slot, &req.volume_id)?.unwrap_or(lv);
            self.refuse_busy(&lv, &req.volume_id)?;
            lv
        };
        // The erasing LV is the eraser's alone and keeps its extents, so the
        // group stays unlocked while it is zeroed.
        self.zero_all(slot, &lv, progress)
    }

    fn resize(&self, req: &DeviceRequest) -> Result<Device> {
        let slot = self.slot(&req.region)?;
        let _g = relock(&slot.lock);
        let Some(lv) = self.lv_of(slot, &req.volume_id)? else {
            return Err(Error::Device(format!(
                "logical volume {}/{} of volume {} is gone",
                slot.vg, req.volume_id, req.volume_id
            )));
        };
        if lv.size < req.size.0 {
            let size = bytes_arg(req.size);
            self.change(
                "lvextend",
                &["--size", &size, &format!("{}/{}", slot.vg, lv.name)],
            )?;
        }
        let lv = self.lv_of(slot, &req.volume_id)?.unwrap_or(lv);
        self.device_of(slot, &lv)
    }

    fn inventory(&self) -> Result<Vec<InventoryItem>> {
        let snap = self.snapshot()?;
        let mut out = Vec::new();
        for s in &self.slots {
            for lv in &Self::vg(&snap, s)?.lvs {
                out.push(InventoryItem {
                    region: s.region.clone(),
                    path: format!("{}/{}", s.vg, lv.name),
                    offset: Bytes::ZERO,
                    size: Bytes(lv.size),
                    owner: if Self::ours(lv) {
                        Owner::Ours(Self::volume_of(lv).to_owned())
                    } else {
                        Owner::Foreign(format!(
                            "logical volume {}/{} ({} bytes, tags {:?})",
                            s.vg, lv.name, lv.size, lv.tags
                        ))
                    },
                });
            }
        }
        Ok(out)
    }

    fn is_retired(&self, item: &InventoryItem) -> bool {
        item.path
            .rsplit_once('/')
            .is_some_and(|(_, lv)| lv.starts_with(ERASING_PREFIX))
    }

    fn remove_orphan(&self, item: &InventoryItem) -> Result<()> {
        let Owner::Ours(id) = &item.owner else {
            return Err(Error::FailedPrecondition(format!(
                "refusing to remove foreign logical volume {}",
                item.path
            )));
        };
        let slot = self.slot(&item.region)?;
        let _g = relock(&slot.lock);
        let lv = match self.lv_of(slot, id)? {
            Some(lv) => lv,
            None => match self.retired_of(slot, id)? {
                Some(lv) => lv,
                None => return Ok(()),
            },
        };
        if item.path != format!("{}/{}", slot.vg, lv.name) {
            return Err(Error::FailedPrecondition(format!(
                "logical volume {} changed since the inventory; not removing it",
                item.path
            )));
        }
        // It may hold a tenant's data: zero it before its extents are free.
        self.refuse_busy(&lv, id)?;
        self.activate(slot, &lv)?;
        let lv = self.lv_named(slot, &lv.name)?.unwrap_or(lv);
        self.zero_all(slot, &lv, &mut |_| Ok(()))?;
        self.remove(slot, &lv, id)
    }

    fn region_stamp(&self, region: &str) -> Result<RegionStamp> {
        let slot = self.slot(region)?;
        let snap = self.snapshot()?;
        let Some(vg) = snap.vg(&slot.vg) else {
            return Ok(RegionStamp::Missing(format!(
                "its volume group {} is gone",
                slot.vg
            )));
        };
        let ids: Vec<&str> = vg
            .tags
            .iter()
            .filter_map(|t| t.strip_prefix(LEDGER_TAG_PREFIX))
            .collect();
        Ok(match ids.as_slice() {
            [] => RegionStamp::Unstamped,
            [one] => RegionStamp::Stamped((*one).to_owned()),
            many => RegionStamp::Stamped(format!("several ledger tags: {}", many.join(", "))),
        })
    }

    fn stamp_region(&self, region: &str, ledger_id: &str) -> Result<()> {
        let slot = self.slot(region)?;
        let _g = relock(&slot.lock);
        let snap = self.snapshot()?;
        let vg = Self::vg(&snap, slot)?;
        let want = format!("{LEDGER_TAG_PREFIX}{ledger_id}");
        if vg.tags.contains(&want) {
            return Ok(());
        }
        if let Some(other) = vg.tags.iter().find(|t| t.starts_with(LEDGER_TAG_PREFIX)) {
            return Err(Error::FailedPrecondition(format!(
                "volume group {} already carries another ledger's tag {other}",
                slot.vg
            )));
        }
        self.change("vgchange", &["--addtag", &want, &slot.vg])
    }

    fn reinit_region(&self, region: &str, ledger_id: &str) -> Result<Vec<String>> {
        let slot = self.slot(region)?;
        let mut lines = Vec::new();
        {
            let _g = relock(&slot.lock);
            self.refresh();
            let snap = self.snapshot()?;
            let vg = Self::vg(&snap, slot)?;
            for lv in vg.lvs.iter().filter(|lv| Self::ours(lv)) {
                self.refuse_busy(lv, &lv.name)?;
                if !self.cfg.metadata_only && !lv.active {
                    self.change(
                        "lvchange",
                        &["--activate", "y", &format!("{}/{}", slot.vg, lv.name)],
                    )?;
                }
                self.zero_all(slot, lv, &mut |_| Ok(()))?;
                self.remove(slot, lv, &lv.name)?;
                lines.push(format!("erased and removed {}/{}", slot.vg, lv.name));
            }
            let want = format!("{LEDGER_TAG_PREFIX}{ledger_id}");
            for t in vg
                .tags
                .iter()
                .filter(|t| t.starts_with(LEDGER_TAG_PREFIX) && **t != want)
            {
                self.change("vgchange", &["--deltag", t, &slot.vg])?;
                lines.push(format!("removed tag {t} from {}", slot.vg));
            }
        }
        self.stamp_region(region, ledger_id)?;
        lines.push(format!("tagged {} for ledger {ledger_id}", slot.vg));
        Ok(lines)
    }
}

#[cfg(test)]
mod identity_tests {
    //! The identity tag through a scripted lvm: what the backend runs and
    //! how the allocator judges what the report then shows.

    use super::*;
    use crate::allocator::Allocator;
    use pvs::PvRegion;
    use std::collections::BTreeMap;

    #[derive(Debug, Default)]
    struct VgState {
        tags: Vec<String>,
    }

    /// A tiny lvm: PVs, volume groups with tags, no LVs.
    #[derive(Debug, Default)]
    struct Scripted {
        pvs: Mutex<BTreeMap<String, String>>,
        vgs: Mutex<BTreeMap<String, VgState>>,
        log: Mutex<Vec<String>>,
    }

    impl command::LvmRunner for Scripted {
        fn run(&self, sub: &str, args: &[&str]) -> Result<String> {
            relock(&self.log).push(format!("{sub} {}", args.join(" ")));
            let mut vgs = relock(&self.vgs);
            let mut pvs = relock(&self.pvs);
            match sub {
                "fullreport" => {
                    let pv = |d: &str| serde_json::json!({"pv_name": d, "pe_start": "2097152", "pv_size": "1073741824"});
                    let mut report: Vec<serde_json::Value> = vgs
                        .iter()
                        .map(|(name, v)| {
                            serde_json::json!({
                                "vg": [{"vg_name": name, "vg_tags": v.tags.join(","),
                                        "vg_extent_size": "4194304", "vg_extent_count": "255",
                                        "vg_free_count": "255", "vg_size": "1069547520"}],
                                "pv": pvs.iter().filter(|(_, g)| *g == name).map(|(d, _)| pv(d)).collect::<Vec<_>>(),
                                "lv": [], "pvseg": [], "seg": []
                            })
                        })
                        .collect();
                    report.push(serde_json::json!({
                        "vg": [], "lv": [], "pvseg": [], "seg": [],
                        "pv": pvs.iter().filter(|(_, g)| g.is_empty()).map(|(d, _)| pv(d)).collect::<Vec<_>>(),
                    }));
                    return Ok(serde_json::json!({ "report": report }).to_string());
                }
                "pvcreate" => {
                    pvs.insert(args[args.len() - 1].to_owned(), String::new());
                }
                "vgcreate" => {
                    // --addtag TAG --physicalextentsize N VG DEV...
                    let vg = args[4].to_owned();
                    for d in &args[5..] {
                        pvs.insert((*d).to_owned(), vg.clone());
                    }
                    vgs.insert(
                        vg,
                        VgState {
                            tags: vec![args[1].to_owned()],
                        },
                    );
                }
                "vgchange" if args[0] == "--addtag" => {
                    vgs.get_mut(args[2]).unwrap().tags.push(args[1].to_owned());
                }
                "vgchange" if args[0] == "--deltag" => {
                    vgs.get_mut(args[2]).unwrap().tags.retain(|t| t != args[1]);
                }
                "vgchange" => {}
                other => panic!("unexpected lvm {other} {args:?}"),
            }
            Ok(String::new())
        }

        fn invocations(&self) -> u64 {
            relock(&self.log).len() as u64
        }
    }

    /// The regions as given (the scripted lvm has no real devices).
    #[derive(Debug)]
    struct Given(Vec<PvRegion>);

    impl PvSource for Given {
        fn prepare(&self) -> Result<Vec<PvRegion>> {
            Ok(self.0.clone())
        }
        fn describe(&self) -> String {
            "given".into()
        }
    }

    fn open(lvm: &Arc<Scripted>) -> Arc<LvmBackend> {
        let source = Given(vec![
            PvRegion {
                region: "region0".into(),
                numa_node: 0,
                devices: vec!["/dev/fake0".into()],
            },
            PvRegion {
                region: "region1".into(),
                numa_node: 0,
                devices: vec!["/dev/fake1".into()],
            },
        ]);
        Arc::new(
            LvmBackend::open(
                lvm.clone(),
                &source,
                LvmConfig {
                    metadata_only: true,
                    ..LvmConfig::default()
                },
            )
            .unwrap(),
        )
    }

    #[test]
    fn volume_groups_carry_the_ledger_tag_and_a_lost_one_is_reported() {
        let lvm = Arc::new(Scripted::default());
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.db");
        let a = Allocator::open(&ledger, open(&lvm)).unwrap();
        let id = a.ledger_id().unwrap();
        let tag = format!("{LEDGER_TAG_PREFIX}{id}");
        for vg in ["pmem-region0", "pmem-region1"] {
            assert!(relock(&lvm.vgs)[vg].tags.contains(&tag));
        }
        assert!(
            relock(&lvm.log)
                .iter()
                .any(|l| *l == format!("vgchange --addtag {tag} pmem-region0"))
        );
        assert!(a.lost_regions().is_empty() && a.refusal().is_none());
        drop(a);

        // region0's group removed and re-created by hand (its PV kept):
        // the new group has no ledger tag, so region0 is lost.
        relock(&lvm.vgs).remove("pmem-region0");
        relock(&lvm.pvs).insert("/dev/fake0".into(), String::new());
        let b = open(&lvm);
        let a = Allocator::open(&ledger, b.clone()).unwrap();
        assert!(
            a.lost_regions()["region0"].contains("stamp is gone"),
            "{:?}",
            a.lost_regions()
        );
        assert!(!relock(&lvm.vgs)["pmem-region0"].tags.contains(&tag));
        let caps = a.capacity(crate::volume::Usage::AppDirect).unwrap();
        assert_eq!(caps[0].available, Bytes::ZERO);
        assert!(caps[1].available > Bytes::ZERO);
        // Another ledger's tag on region1: lost too, the reason says so.
        relock(&lvm.vgs)
            .get_mut("pmem-region1")
            .unwrap()
            .tags
            .retain(|t| t != &tag);
        relock(&lvm.vgs)
            .get_mut("pmem-region1")
            .unwrap()
            .tags
            .push(format!("{LEDGER_TAG_PREFIX}0123"));
        drop(a);
        let a = Allocator::open(&ledger, b.clone()).unwrap();
        // No region carries this ledger's id and one carries another's:
        // that is a replaced ledger, refused as a whole.
        assert!(a.refusal().is_some_and(|r| r.contains("was replaced")));
        drop(a);
        // Back to one good region: reinit takes the other one back.
        relock(&lvm.vgs)
            .get_mut("pmem-region0")
            .unwrap()
            .tags
            .push(tag.clone());
        let a = Allocator::open(&ledger, b.clone()).unwrap();
        assert!(a.lost_regions()["region1"].contains("another ledger (0123)"));
        a.reinit_region("region1").unwrap();
        assert!(a.lost_regions().is_empty());
        let t = &relock(&lvm.vgs)["pmem-region1"].tags;
        assert!(
            t.contains(&tag) && !t.iter().any(|x| x.ends_with(".0123")),
            "{t:?}"
        );
    }
}

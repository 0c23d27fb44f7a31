//! The device backend trait: what the allocator needs from real hardware
//! (libnvdimm, LVM) or from the simulation. Every method is idempotent, so
//! the allocator can replay any step after a crash.

use std::fmt::Debug;

use crate::error::Result;
use crate::region::RegionSpec;
use crate::units::Bytes;
use crate::volume::Usage;

/// Everything a backend needs to know to make, find or remove a volume's
/// device. Derived from the ledger row, so recovery can rebuild it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    pub volume_id: String,
    pub region: String,
    pub offset: Bytes,
    pub size: Bytes,
    pub usage: Usage,
}

/// Told the bytes of each chunk an erase zeroed; an error aborts the erase.
pub type Progress<'a> = &'a mut dyn FnMut(u64) -> Result<()>;

/// A device as it exists now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Block device node, or `None` where the backend has none (sim file-only mode).
    pub path: Option<String>,
    pub size: Bytes,
}

/// Who a device found in our regions belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Carries our marker with this volume id.
    Ours(String),
    /// Not made by us; described for the operator, never touched.
    Foreign(String),
}

/// One device found in a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryItem {
    pub region: String,
    pub path: String,
    pub offset: Bytes,
    pub size: Bytes,
    pub owner: Owner,
}

/// How a region's device layer chooses where a new extent goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// The allocator chooses: the smallest free extent that fits.
    #[default]
    BestFit,
    /// The device layer allocates by itself, lowest offset first (libnvdimm
    /// namespaces); the ledger must pick that same extent.
    FirstFit,
    /// Volumes need no contiguous extent, only free bytes (LVM logical
    /// volumes); the ledger records them at offset 0.
    Pooled,
}

/// Space the device layer has allocated in a region, ours or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub region: String,
    pub offset: Bytes,
    pub len: Bytes,
    /// The volume id in the device's marker, when it is ours.
    pub volume: Option<String>,
    /// The device's name, for logs (and the reservation's key in a pool).
    pub device: String,
}

/// The identity a region carries: the ledger that stamped it
/// (see `identity.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionStamp {
    /// The backend has no place for an identity (test doubles only).
    Unsupported,
    /// The region is there but carries no stamp.
    Unstamped,
    /// Stamped with this ledger id.
    Stamped(String),
    /// The region's storage itself is gone (sim: its file; lvm: its volume
    /// group; direct: our identity namespace can only be `Unstamped`); why.
    Missing(String),
}

/// A device backend. Implementations must be safe to call from several
/// threads; the allocator serialises operations on the same volume.
pub trait Backend: Send + Sync + Debug {
    /// `sim`, `direct` or `lvm`.
    fn kind(&self) -> &'static str;

    /// A line for the log: which mode is active and why.
    fn describe(&self) -> String;

    /// The regions this backend serves, discovered or configured.
    fn regions(&self) -> Result<Vec<RegionSpec>>;

    /// Extent bytes needed so the usable device holds at least `usable` bytes.
    /// The default has no metadata overhead.
    fn extent_for(&self, _region: &RegionSpec, usable: Bytes, _usage: Usage) -> Bytes {
        usable
    }

    /// Usable device bytes on an extent of `extent` bytes; inverse of `extent_for`.
    fn usable_for(&self, _region: &RegionSpec, extent: Bytes, _usage: Usage) -> Bytes {
        extent
    }

    /// Where the device layer puts new extents; the allocator places alike.
    fn placement(&self) -> Placement {
        Placement::BestFit
    }

    /// Everything the device layer has allocated, ours or not. Read at open
    /// and on [`crate::Allocator::refresh_reserved`]: the allocator reserves
    /// what no ledger volume covers (foreign devices, orphans), so that
    /// space is never offered.
    fn reserved(&self) -> Result<Vec<Allocated>> {
        Ok(Vec::new())
    }

    /// Why a region can hold no new volumes at all (e.g. a label-less
    /// libnvdimm region), or `None`. A create that only such regions could
    /// serve fails with `Error::FailedPrecondition` and this text.
    fn unusable_reason(&self, _region: &str) -> Option<String> {
        None
    }

    /// Whether volumes can grow at all (ControllerExpandVolume and the
    /// EXPAND_VOLUME capabilities are offered only then).
    fn can_resize(&self) -> bool {
        true
    }

    /// Refuses an expansion before anything is recorded. Called with the
    /// allocator's state lock held: must not do device work.
    fn check_resize(&self, _req: &DeviceRequest, _new_size: Bytes) -> Result<()> {
        Ok(())
    }

    /// Forgets cached device state, so the next calls read the devices
    /// afresh (reconciliation starts with it: others may have changed them).
    fn refresh(&self) {}

    /// Called once before the first `create` of a new volume (never for a
    /// volume that was ready): the backend may make a device for it from
    /// scratch. No zeroing happens here; extents are zeroed when a volume
    /// is deleted ([`Backend::erase`]).
    fn begin_create(&self, _req: &DeviceRequest) -> Result<()> {
        Ok(())
    }

    /// Fails with `Error::FailedPrecondition` when the volume's device is in
    /// use (mounted, open exclusively), so a delete can refuse before it starts.
    fn check_idle(&self, _req: &DeviceRequest) -> Result<()> {
        Ok(())
    }

    /// Makes the device exist (or finds it) and returns it.
    fn create(&self, req: &DeviceRequest) -> Result<Device>;

    /// Finds the device if it exists.
    fn find(&self, req: &DeviceRequest) -> Result<Option<Device>>;

    /// [`Backend::find`] for many volumes, answers in the same order; a
    /// backend that can read its devices once for all of them does
    /// (reconciliation checks every volume: sim lists loop devices once,
    /// not once per volume).
    fn find_all(&self, reqs: &[DeviceRequest]) -> Vec<Result<Option<Device>>> {
        reqs.iter().map(|r| self.find(r)).collect()
    }

    /// Removes the device and frees its extent in the device layer, also a
    /// retired one; absent is success. A device in use is refused with
    /// `Error::FailedPrecondition` before anything changes.
    fn destroy(&self, req: &DeviceRequest) -> Result<()>;

    /// Takes the device away from its tenant before an erase: afterwards the
    /// volume has no block device, but the device layer still holds the
    /// extent (direct: the namespace under the erasing marker; lvm: the LV
    /// under its erasing name), so nothing can be created over it before
    /// [`Backend::destroy`]. A device in use is refused with
    /// `Error::FailedPrecondition` before anything changes. Idempotent.
    /// The default is `destroy` (the sim backend's extent is ours anyway).
    fn retire(&self, req: &DeviceRequest) -> Result<()> {
        self.destroy(req)
    }

    /// Zeroes a retired volume's extent and verifies it, in chunks; calls
    /// `progress` with each chunk's bytes (an error from it aborts the
    /// erase, which is then repeated from the start). Idempotent. The zeros
    /// need not be durable yet: the eraser calls [`Backend::sync_erased`]
    /// for its whole batch before any of their rows is removed.
    fn erase(&self, req: &DeviceRequest, progress: Progress<'_>) -> Result<()>;

    /// Makes the zeros of every erase in `erased` durable, with one data
    /// sync per region file or device (sim: one `fsync` per region file for
    /// the whole batch). Until it returns no row that frees those extents
    /// may be committed: a power loss must never leave a free extent whose
    /// old bytes are back. The default does nothing, for backends whose
    /// `erase` syncs each device itself (direct and lvm: every volume is a
    /// device of its own, so there is nothing to share).
    fn sync_erased(&self, _erased: &[DeviceRequest]) -> Result<()> {
        Ok(())
    }

    /// Whether an inventory item of ours is a deleted volume's retired
    /// device whose erase was interrupted (direct: the erasing marker; lvm:
    /// the erasing name). A ledger rebuild must not bring it back as a
    /// volume; it stays reserved as an orphan, whose removal zeroes it.
    fn is_retired(&self, _item: &InventoryItem) -> bool {
        false
    }

    /// Makes the device `req.size` bytes (the extent already grew in the ledger).
    fn resize(&self, req: &DeviceRequest) -> Result<Device>;

    /// Every device in our regions, ours or foreign.
    fn inventory(&self) -> Result<Vec<InventoryItem>>;

    /// Removes a device of ours that no volume owns (orphan clean-up),
    /// zeroing its extent first: it may hold a tenant's data.
    fn remove_orphan(&self, item: &InventoryItem) -> Result<()>;

    /// The identity the region carries. Must not create anything. May
    /// answer from cached device state: a caller that needs it current
    /// calls [`Backend::refresh`] first (once for a run over all regions).
    fn region_stamp(&self, _region: &str) -> Result<RegionStamp> {
        Ok(RegionStamp::Unsupported)
    }

    /// Stamps the region with `ledger_id`, creating its storage when it
    /// does not exist yet (a first start). Idempotent.
    fn stamp_region(&self, _region: &str, _ledger_id: &str) -> Result<()> {
        Ok(())
    }

    /// Erases the region for a new start: every device of ours in it is
    /// removed with its data (a device in use is refused), what else of the
    /// region the backend can reach is zeroed, and it is stamped with
    /// `ledger_id`. Foreign devices are never touched. Returns one line per
    /// device removed.
    fn reinit_region(&self, region: &str, _ledger_id: &str) -> Result<Vec<String>> {
        Err(crate::error::Error::FailedPrecondition(format!(
            "the {} backend cannot reinitialize region {region}",
            self.kind()
        )))
    }

    /// Tells the backend which ledger it serves (direct: the markers of new
    /// namespaces carry a short form of it).
    fn set_ledger_id(&self, _ledger_id: &str) {}

    /// The usage of a device of ours found without a ledger row, for
    /// `ledger rebuild` (direct: sector mode is FileIO).
    fn recovered_usage(&self, _item: &InventoryItem) -> Usage {
        Usage::AppDirect
    }

    /// After a ledger rebuild: zeroes space of the region that no recovered
    /// volume holds where it may still hold an earlier volume's data (sim:
    /// loop devices do not survive a reboot, so a lost volume leaves no
    /// marker). Backends whose free space is unreachable do nothing.
    fn scrub_free(&self, _region: &str, _free: &[(Bytes, Bytes)]) -> Result<()> {
        Ok(())
    }
}

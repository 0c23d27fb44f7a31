//! pmem-agent's allocator: the allocation ledger, the region model and
//! placement, and the device backends. Synchronous by design (no async
//! runtime): callers run it on blocking threads.

pub mod allocator;
pub mod backend;
pub mod direct;
pub mod durability;
pub mod erase;
pub mod error;
pub mod identity;
pub mod ledger;
pub mod loopdev;
pub mod lvm;
pub mod reconcile;
pub mod region;
pub mod sim;
pub mod space;
pub mod units;
pub mod volume;

pub use allocator::{Allocator, CreateRequest, Holder, PageEntry, RegionCapacity, VolumePage};
pub use backend::{Backend, Device, DeviceRequest, InventoryItem, Owner, RegionStamp};
pub use erase::{ErasePolicy, EraseStats};
pub use error::{Error, Result};
pub use identity::{RebuildReport, RegionRecovery};
pub use reconcile::ReconcileReport;
pub use region::{ExtentMap, RegionSpec};
pub use units::Bytes;
pub use volume::{Persistency, Publication, PublicationKind, Usage, Volume, VolumeState};

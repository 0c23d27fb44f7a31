//! Conversions between the allocator's types and the admin/allocator wire
//! messages (`pmem.admin.v1`), both ways.

use std::collections::{BTreeMap, HashMap};

use pmem_allocator::region::Extent;
use pmem_allocator::{
    Bytes, Error, Holder, InventoryItem, Owner, PageEntry, Persistency, Publication,
    PublicationKind, RebuildReport, ReconcileReport, RegionCapacity, RegionRecovery, RegionSpec,
    Usage, Volume, VolumePage, VolumeState,
};
use pmem_proto::admin;

use crate::store::LedgerStatus;
use tonic::{Code, Status};

fn bad(what: &str, v: &str) -> Error {
    Error::InvalidArgument(format!("{what} {v:?} is not valid"))
}

pub fn volume_to_wire(v: &Volume, usable: Bytes, pubs: &[Publication]) -> admin::Volume {
    admin::Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        region: v.region.clone(),
        offset_bytes: v.offset.0,
        size_bytes: v.size.0,
        requested_bytes: v.requested.0,
        usage: v.usage.as_str().to_owned(),
        erase_after: v.erase_after,
        persistency: v.persistency.as_str().to_owned(),
        state: v.state.to_string(),
        device: v.device.clone().unwrap_or_default(),
        parameters: v
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        context: v
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
        publications: pubs
            .iter()
            .filter(|p| p.volume_id == v.id)
            .map(publication_to_wire)
            .collect(),
        usable_bytes: usable.0,
        seq: v.seq,
    }
}

/// The publications of volume `id` in `pubs` sorted by volume id (as the
/// ledger lists them): a binary search, not a scan per volume.
pub fn publications_of<'a>(pubs: &'a [Publication], id: &str) -> &'a [Publication] {
    let start = pubs.partition_point(|p| p.volume_id.as_str() < id);
    let end = start + pubs[start..].partition_point(|p| p.volume_id == id);
    &pubs[start..end]
}

pub fn volume_from_wire(w: &admin::Volume) -> Result<Volume, Error> {
    Ok(Volume {
        id: w.id.clone(),
        name: w.name.clone(),
        region: w.region.clone(),
        offset: Bytes(w.offset_bytes),
        size: Bytes(w.size_bytes),
        requested: Bytes(w.requested_bytes),
        usage: w.usage.parse().map_err(|_| bad("usage", &w.usage))?,
        erase_after: w.erase_after,
        parameters: w
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        persistency: w
            .persistency
            .parse()
            .map_err(|_| bad("persistency", &w.persistency))?,
        context: w
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        state: w.state.parse().map_err(|_| bad("state", &w.state))?,
        device: (!w.device.is_empty()).then(|| w.device.clone()),
        seq: w.seq,
    })
}

pub fn publication_to_wire(p: &Publication) -> admin::Publication {
    admin::Publication {
        kind: p.kind.as_str().to_owned(),
        path: p.path.clone(),
        readonly: p.readonly,
        volume_id: p.volume_id.clone(),
        capability: p.capability.clone(),
        device: p.device.unwrap_or(0),
    }
}

pub fn publication_from_wire(w: &admin::Publication) -> Result<Publication, Error> {
    Ok(Publication {
        volume_id: w.volume_id.clone(),
        kind: w
            .kind
            .parse::<PublicationKind>()
            .map_err(|_| bad("publication kind", &w.kind))?,
        path: w.path.clone(),
        readonly: w.readonly,
        capability: w.capability.clone(),
        device: (w.device != 0).then_some(w.device),
    })
}

pub fn region_to_wire(c: &RegionCapacity, backend: &str) -> admin::Region {
    admin::Region {
        id: c.spec.id.clone(),
        backend: backend.to_owned(),
        size_bytes: c.spec.size.0,
        align_bytes: c.spec.align.0,
        available_bytes: c.available.0,
        largest_allocatable_bytes: c.largest.0,
        minimum_volume_bytes: c.minimum.0,
        namespace_slots: c.spec.ns_slots,
        free_namespace_slots: c.free_slots,
        numa_node: c.spec.numa_node,
        location: c.spec.location.clone(),
        extents: c
            .extents
            .iter()
            .map(|(e, holder)| {
                let (volume_id, state) = match holder {
                    Holder::Volume { id, state } => (id.clone(), state.to_string()),
                    Holder::Free | Holder::Reserved => (String::new(), String::new()),
                };
                admin::Extent {
                    offset_bytes: e.offset.0,
                    size_bytes: e.len.0,
                    volume_id,
                    state,
                    reserved: *holder == Holder::Reserved,
                }
            })
            .collect(),
        lost: c.lost.clone().unwrap_or_default(),
        volumes: c.volumes,
    }
}

pub fn page_to_wire(p: &VolumePage) -> admin::VolumePageResponse {
    admin::VolumePageResponse {
        ledger_id: p.ledger_id.clone(),
        volumes: p
            .entries
            .iter()
            .map(|e| volume_to_wire(&e.volume, e.usable, &[]))
            .collect(),
        lost_regions: p
            .entries
            .iter()
            .filter_map(|e| Some((e.volume.region.clone(), e.lost.clone()?)))
            .collect(),
        more: p.more,
    }
}

pub fn page_from_wire(w: admin::VolumePageResponse) -> Result<VolumePage, Error> {
    let entries = w
        .volumes
        .iter()
        .map(|v| {
            Ok(PageEntry {
                volume: volume_from_wire(v)?,
                usable: Bytes(v.usable_bytes),
                lost: w.lost_regions.get(&v.region).cloned(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(VolumePage {
        ledger_id: w.ledger_id,
        entries,
        more: w.more,
    })
}

pub fn counts_to_wire(counts: &[(VolumeState, Persistency, u64)]) -> admin::VolumeCountsResponse {
    admin::VolumeCountsResponse {
        counts: counts
            .iter()
            .map(|(s, p, n)| admin::VolumeCount {
                state: s.as_str().to_owned(),
                persistency: p.as_str().to_owned(),
                count: *n,
            })
            .collect(),
    }
}

pub fn counts_from_wire(
    w: &admin::VolumeCountsResponse,
) -> Result<Vec<(VolumeState, Persistency, u64)>, Error> {
    w.counts
        .iter()
        .map(|c| {
            Ok((
                c.state.parse().map_err(|_| bad("state", &c.state))?,
                c.persistency
                    .parse()
                    .map_err(|_| bad("persistency", &c.persistency))?,
                c.count,
            ))
        })
        .collect()
}

pub fn region_from_wire(w: &admin::Region) -> Result<RegionCapacity, Error> {
    let extents = w
        .extents
        .iter()
        .map(|e| {
            let holder = if e.reserved {
                Holder::Reserved
            } else if e.volume_id.is_empty() {
                Holder::Free
            } else {
                Holder::Volume {
                    id: e.volume_id.clone(),
                    state: e
                        .state
                        .parse::<VolumeState>()
                        .map_err(|_| bad("state", &e.state))?,
                }
            };
            Ok((
                Extent {
                    offset: Bytes(e.offset_bytes),
                    len: Bytes(e.size_bytes),
                },
                holder,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(RegionCapacity {
        spec: RegionSpec {
            id: w.id.clone(),
            size: Bytes(w.size_bytes),
            align: Bytes(w.align_bytes),
            ns_slots: w.namespace_slots,
            numa_node: w.numa_node,
            location: w.location.clone(),
        },
        available: Bytes(w.available_bytes),
        largest: Bytes(w.largest_allocatable_bytes),
        minimum: Bytes(w.minimum_volume_bytes),
        free_slots: w.free_namespace_slots,
        volumes: w.volumes,
        extents,
        lost: (!w.lost.is_empty()).then(|| w.lost.clone()),
    })
}

fn device_to_wire(i: &InventoryItem) -> admin::Device {
    admin::Device {
        region: i.region.clone(),
        path: i.path.clone(),
        offset_bytes: i.offset.0,
        size_bytes: i.size.0,
        owner: match &i.owner {
            Owner::Ours(id) => id.clone(),
            Owner::Foreign(what) => what.clone(),
        },
    }
}

fn device_from_wire(w: &admin::Device, ours: bool) -> InventoryItem {
    InventoryItem {
        region: w.region.clone(),
        path: w.path.clone(),
        offset: Bytes(w.offset_bytes),
        size: Bytes(w.size_bytes),
        owner: if ours {
            Owner::Ours(w.owner.clone())
        } else {
            Owner::Foreign(w.owner.clone())
        },
    }
}

pub fn report_to_wire(r: &ReconcileReport) -> admin::ReconcileReport {
    admin::ReconcileReport {
        actions: r.actions.clone(),
        orphans: r.orphans.iter().map(device_to_wire).collect(),
        foreign: r.foreign.iter().map(device_to_wire).collect(),
        missing: r.missing.clone(),
        dry_run: r.dry_run,
        errors: r.errors.clone(),
        ..Default::default()
    }
}

pub fn report_from_wire(w: &admin::ReconcileReport) -> ReconcileReport {
    ReconcileReport {
        dry_run: w.dry_run,
        actions: w.actions.clone(),
        orphans: w
            .orphans
            .iter()
            .map(|d| device_from_wire(d, true))
            .collect(),
        foreign: w
            .foreign
            .iter()
            .map(|d| device_from_wire(d, false))
            .collect(),
        missing: w.missing.clone(),
        errors: w.errors.clone(),
    }
}

pub fn rebuild_to_wire(
    r: &RebuildReport,
    usable: impl Fn(&Volume) -> Bytes,
) -> admin::RebuildLedgerResponse {
    admin::RebuildLedgerResponse {
        applied: r.applied,
        ledger_id: r.ledger_id.clone(),
        volumes: r
            .volumes
            .iter()
            .map(|v| volume_to_wire(v, usable(v), &[]))
            .collect(),
        skipped: r.skipped.clone(),
        regions: r.regions.clone(),
        backup: r.backup.clone().unwrap_or_default(),
    }
}

pub fn rebuild_from_wire(w: &admin::RebuildLedgerResponse) -> Result<RebuildReport, Error> {
    Ok(RebuildReport {
        applied: w.applied,
        ledger_id: w.ledger_id.clone(),
        volumes: w
            .volumes
            .iter()
            .map(volume_from_wire)
            .collect::<Result<_, _>>()?,
        skipped: w.skipped.clone(),
        regions: w.regions.clone(),
        backup: (!w.backup.is_empty()).then(|| w.backup.clone()),
    })
}

pub fn recovery_to_wire(r: &RegionRecovery) -> admin::RegionRecoveryResponse {
    admin::RegionRecoveryResponse {
        region: r.region.clone(),
        volumes: r
            .volumes
            .iter()
            .map(|v| volume_to_wire(v, v.size, &[]))
            .collect(),
        actions: r.actions.clone(),
    }
}

pub fn recovery_from_wire(w: &admin::RegionRecoveryResponse) -> Result<RegionRecovery, Error> {
    Ok(RegionRecovery {
        region: w.region.clone(),
        volumes: w
            .volumes
            .iter()
            .map(volume_from_wire)
            .collect::<Result<_, _>>()?,
        actions: w.actions.clone(),
    })
}

pub fn ledger_status_to_wire(s: LedgerStatus) -> admin::LedgerStatusResponse {
    admin::LedgerStatusResponse {
        ledger_id: s.ledger_id,
        refused: s.refused.unwrap_or_default(),
        lost_regions: s.lost.into_iter().collect(),
    }
}

pub fn ledger_status_from_wire(w: admin::LedgerStatusResponse) -> LedgerStatus {
    LedgerStatus {
        ledger_id: w.ledger_id,
        refused: (!w.refused.is_empty()).then_some(w.refused),
        lost: w.lost_regions.into_iter().collect(),
    }
}

pub fn usage_from_wire(s: &str) -> Result<Usage, Error> {
    if s.is_empty() {
        return Ok(Usage::AppDirect);
    }
    s.parse().map_err(|_| bad("usage", s))
}

pub fn persistency_from_wire(s: &str) -> Result<Persistency, Error> {
    s.parse().map_err(|_| bad("persistency", s))
}

/// The allocator's error as a status (pmem-allocd's boundary).
pub fn error_to_status(e: &Error) -> Status {
    let code = crate::error::alloc_code(e);
    Status::new(code, e.to_string())
}

/// A status from pmem-allocd back into the allocator's error, keeping its
/// meaning (the agent maps it to the same CSI code as in-process).
pub fn status_to_error(s: &Status) -> Error {
    let m = s.message().to_owned();
    match s.code() {
        Code::InvalidArgument => Error::InvalidArgument(m),
        Code::NotFound => Error::NotFound(m),
        Code::AlreadyExists => Error::Conflict(m),
        Code::ResourceExhausted => Error::Exhausted {
            message: m,
            available: Bytes::ZERO,
            largest: Bytes::ZERO,
        },
        Code::OutOfRange => Error::OutOfRange(m),
        Code::FailedPrecondition => Error::FailedPrecondition(m),
        Code::Aborted => Error::Busy(m),
        Code::Unavailable => Error::Unavailable(format!("allocator daemon unavailable: {m}")),
        code => Error::Device(format!("allocator daemon: {code:?}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_round_trip_with_every_holder() {
        let ext = |o: u64, l: u64| Extent {
            offset: Bytes(o),
            len: Bytes(l),
        };
        let c = RegionCapacity {
            spec: RegionSpec {
                id: "region0".into(),
                size: Bytes(48),
                align: Bytes(16),
                ns_slots: 4,
                numa_node: 1,
                location: "here".into(),
            },
            available: Bytes(16),
            largest: Bytes(16),
            minimum: Bytes(16),
            free_slots: 2,
            volumes: 1,
            extents: vec![
                (
                    ext(0, 16),
                    Holder::Volume {
                        id: "pmem-1".into(),
                        state: VolumeState::Ready,
                    },
                ),
                (ext(16, 16), Holder::Reserved),
                (ext(32, 16), Holder::Free),
            ],
            lost: Some("its region file is gone".into()),
        };
        let w = region_to_wire(&c, "sim");
        assert!(w.extents[1].reserved && w.extents[1].volume_id.is_empty());
        let back = region_from_wire(&w).unwrap();
        assert_eq!(back.extents, c.extents);
        assert_eq!(back.volumes, 1);
        assert_eq!(back.lost, c.lost);
    }
}

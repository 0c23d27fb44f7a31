//! Reconciliation: the ledger against the devices the backend finds. Run at
//! start before serving, and on demand (admin API). Interrupted operations
//! are driven forward (a create the ledger decided is finished; a delete is
//! completed); devices that no volume owns are reported and, only when asked
//! and only when marked as ours, removed. Foreign devices are never touched.

use std::collections::{HashMap, HashSet};

use crate::allocator::{Allocator, device_request};
use crate::backend::{DeviceRequest, InventoryItem, Owner, Placement};
use crate::error::Result;
use crate::ledger::IntentOp;
use crate::volume::VolumeState;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub dry_run: bool,
    /// What was done (or would be, in a dry run), one line each.
    pub actions: Vec<String>,
    /// Devices of ours that no ledger volume owns.
    pub orphans: Vec<InventoryItem>,
    /// Devices in our regions that we did not create.
    pub foreign: Vec<InventoryItem>,
    /// Ready volumes whose device is missing and could not be restored.
    pub missing: Vec<String>,
    /// Steps that failed; they are retried at the next reconciliation.
    pub errors: Vec<String>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.orphans.is_empty() && self.missing.is_empty() && self.errors.is_empty()
    }
}

impl Allocator {
    /// Diffs ledger and devices and repairs what it can (nothing with `dry_run`).
    pub fn reconcile(&self, dry_run: bool, remove_orphans: bool) -> Result<ReconcileReport> {
        if !dry_run {
            self.serving()?;
        }
        let mut rep = ReconcileReport {
            dry_run,
            ..Default::default()
        };
        let lost = self.lost_regions();
        self.backend().refresh();
        let expanding: HashSet<String> = self
            .intents()?
            .into_iter()
            .filter(|i| i.op == IntentOp::Expand)
            .map(|i| i.volume_id)
            .collect();
        let rows = self.state().ledger.volume_devices()?;
        // A ready volume whose device is as recorded needs nothing: no name
        // lock, no re-read. The backend looks them all up at once (sim: one
        // loop device listing), so start-up stays one light pass.
        let quick: Vec<&crate::ledger::VolumeDevice> = rows
            .iter()
            .filter(|v| {
                v.state == VolumeState::Ready
                    && !expanding.contains(&v.id)
                    && !lost.contains_key(&v.region)
            })
            .collect();
        let reqs: Vec<DeviceRequest> = quick
            .iter()
            .map(|v| DeviceRequest {
                volume_id: v.id.clone(),
                region: v.region.clone(),
                offset: v.offset,
                size: v.size,
                usage: v.usage,
            })
            .collect();
        let as_recorded: HashSet<&str> = quick
            .iter()
            .zip(self.backend().find_all(&reqs))
            .filter(|(v, f)| matches!(f, Ok(Some(d)) if d.path == v.device))
            .map(|(v, _)| v.id.as_str())
            .collect();
        for v in rows.iter().filter(|v| !as_recorded.contains(v.id.as_str())) {
            let name = v.name.clone();
            self.with_name(&name, || {
                // Re-read under the name lock: a live call may have moved it.
                let Ok(Some(v)) = self.volume(&v.id) else {
                    return;
                };
                // A lost region's devices are not ours to re-create (sim
                // would attach over a new, empty file): report only.
                if let Some(why) = lost.get(&v.region) {
                    rep.missing.push(v.id.clone());
                    rep.errors.push(format!(
                        "volume {} is lost: its region {} {why}; run `pmemctl region forget {}` or `pmemctl region reinit {}`",
                        v.id, v.region, v.region, v.region
                    ));
                    return;
                }
                let exp = expanding.contains(&v.id);
                self.reconcile_volume(v, exp, dry_run, &mut rep);
            });
        }
        let known = self.state().ledger.volume_extents()?;
        let by_id: HashMap<&str, (&str, crate::units::Bytes)> = known
            .iter()
            .map(|(id, region, offset, _)| (id.as_str(), (region.as_str(), *offset)))
            .collect();
        for item in self.backend().inventory()? {
            if lost.contains_key(&item.region) {
                // Another ledger's or an unknown identity: never ours to remove.
                continue;
            }
            match &item.owner {
                Owner::Foreign(what) => {
                    tracing::warn!(region = %item.region, device = %item.path, owner = %what, "foreign device in our region; leaving it alone");
                    rep.foreign.push(item);
                }
                Owner::Ours(id) => {
                    let owned = by_id.get(id.as_str()).is_some_and(|(region, offset)| {
                        *region == item.region && *offset == item.offset
                    });
                    if owned || (dry_run && rep.actions.iter().any(|a| a.contains(id.as_str()))) {
                        continue;
                    }
                    tracing::warn!(region = %item.region, device = %item.path, volume = %id, "orphan device: marked as ours but no ledger volume owns it");
                    // Removing an orphan zeroes its extent: never where a
                    // volume of the ledger lives (pools have no offsets).
                    let pooled = self.backend().placement() == Placement::Pooled;
                    let end = item
                        .offset
                        .0
                        .checked_add(item.size.0)
                        .filter(|_| item.size.0 > 0);
                    let overlaps = known.iter().find(|(_, region, offset, size)| {
                        !pooled
                            && *region == item.region
                            && end.is_none_or(|e| offset.0 < e)
                            && offset.0 + size.0 > item.offset.0
                    });
                    if remove_orphans
                        && !dry_run
                        && let Some((kid, ..)) = overlaps
                    {
                        rep.errors.push(format!(
                            "orphan {} (volume {id}) overlaps the extent of volume {kid}; not removing it",
                            item.path
                        ));
                        rep.orphans.push(item);
                    } else if remove_orphans && !dry_run {
                        match self.backend().remove_orphan(&item) {
                            Ok(()) => rep
                                .actions
                                .push(format!("removed orphan {} (volume {id})", item.path)),
                            Err(e) => rep.errors.push(format!("remove orphan {}: {e}", item.path)),
                        }
                    } else {
                        rep.orphans.push(item);
                    }
                }
            }
        }
        if !dry_run {
            // Removed orphans and finished deletes free space; devices
            // changed by others take or free some too.
            if let Err(e) = self.refresh_reserved() {
                rep.errors.push(format!("refresh reserved space: {e}"));
            }
        }
        for a in &rep.actions {
            tracing::info!(dry_run, "reconcile: {a}");
        }
        for e in &rep.errors {
            tracing::error!("reconcile: {e}");
        }
        Ok(rep)
    }

    fn reconcile_volume(
        &self,
        v: crate::volume::Volume,
        expanding: bool,
        dry_run: bool,
        rep: &mut ReconcileReport,
    ) {
        let id = v.id.clone();
        match v.state {
            VolumeState::Creating => {
                rep.actions
                    .push(format!("finish interrupted create of volume {id}"));
                if !dry_run && let Err(e) = self.finish_create(v) {
                    rep.errors
                        .push(format!("finish create of volume {id}: {e}"));
                }
            }
            VolumeState::Deleting => {
                rep.actions
                    .push(format!("finish interrupted delete of volume {id}"));
                if !dry_run && let Err(e) = self.finish_delete(v) {
                    rep.errors
                        .push(format!("finish delete of volume {id}: {e}"));
                }
            }
            // The background eraser owns erasing volumes (erase.rs); their
            // extents stay reserved until it is done.
            VolumeState::Erasing => {
                if !dry_run {
                    self.eraser().kick();
                }
            }
            VolumeState::Ready => {
                let req = device_request(&v);
                if expanding {
                    rep.actions.push(format!(
                        "finish interrupted expansion of volume {id} to {}",
                        v.size
                    ));
                    if !dry_run {
                        match self.backend().resize(&req) {
                            Ok(_) => {
                                if let Err(e) = self.finish_expand(&id) {
                                    rep.errors
                                        .push(format!("record expansion of volume {id}: {e}"));
                                }
                            }
                            Err(e) => rep
                                .errors
                                .push(format!("finish expansion of volume {id}: {e}")),
                        }
                    }
                }
                match self.backend().find(&req) {
                    Ok(Some(d)) if d.path == v.device => {}
                    Ok(Some(d)) => {
                        rep.actions.push(format!(
                            "volume {id} device is now {}",
                            d.path.as_deref().unwrap_or("(none)")
                        ));
                        if !dry_run && let Err(e) = self.set_device(&id, d.path.as_deref()) {
                            rep.errors
                                .push(format!("record device of volume {id}: {e}"));
                        }
                    }
                    Ok(None) => {
                        rep.actions
                            .push(format!("restore missing device of volume {id}"));
                        if !dry_run {
                            match self.backend().create(&req) {
                                Ok(d) => {
                                    if let Err(e) = self.set_device(&id, d.path.as_deref()) {
                                        rep.errors
                                            .push(format!("record device of volume {id}: {e}"));
                                    }
                                }
                                Err(e) => {
                                    rep.missing.push(id.clone());
                                    rep.errors
                                        .push(format!("restore device of volume {id}: {e}"));
                                }
                            }
                        }
                    }
                    Err(e) => rep
                        .errors
                        .push(format!("look up device of volume {id}: {e}")),
                }
            }
        }
    }
}

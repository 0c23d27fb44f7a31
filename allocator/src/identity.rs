//! Ledger identity: the ledger and the regions it allocates from share a
//! UUID, so a lost, emptied or replaced ledger is never taken for a fresh
//! start over regions that still hold volumes (their data would go to the
//! next tenant), and a region that was deleted or replaced is never
//! silently re-created empty under volumes the ledger still records.
//!
//! - The ledger's UUID lives in its `meta` table (made at the first open);
//!   `region_stamps` lists the regions this ledger has stamped.
//! - Each backend keeps the stamp with the region ([`Backend::region_stamp`]):
//!   sim in an extended attribute of the region file, direct in a small
//!   identity namespace of ours per region, lvm in a volume group tag.
//! - At open, [`judge`] compares both. A ledger that has stamped nothing
//!   (new, emptied, or re-created after a loss) over regions that carry a
//!   stamp or devices of ours, or a ledger none of whose regions carry its
//!   UUID while some carry another's, is *refused*: only read-only calls and
//!   the recovery calls ([`Allocator::rebuild_ledger`], `--reinitialize`)
//!   are served. A single region whose stamp is gone or another ledger's is
//!   *lost*: no placement, no capacity, its volumes reported lost, until
//!   [`Allocator::forget_region`] or [`Allocator::reinit_region`].

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{OptionalExtension, params};

use crate::allocator::Allocator;
use crate::backend::{InventoryItem, Owner, RegionStamp};
use crate::error::{Error, Result};
use crate::ledger::{Ledger, commit, sql_err};
use crate::units::Bytes;
use crate::volume::{Persistency, Volume, VolumeState};

/// Context key set on volume rows that `ledger rebuild` re-created.
pub const REBUILT_KEY: &str = "pmem-agent/rebuilt";

/// How to get out of a refusal; part of every refusal message.
pub const RECOVERY_HINT: &str = "to recover, run `pmemctl ledger rebuild` (a dry run that lists the volumes it would re-create from the devices' markers) and then `pmemctl ledger rebuild --apply`; or restart pmem-agent with --reinitialize to erase every region and start empty (ALL DATA IS LOST)";

impl Ledger {
    /// This ledger's UUID (32 hex digits), made at the first call.
    pub fn ledger_id(&mut self) -> Result<String> {
        let path = self.path().to_owned();
        let conn = self.conn_mut();
        let id: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'ledger_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| sql_err(&path, e))?;
        if let Some(id) = id {
            return Ok(id);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('ledger_id', ?1)",
            [&id],
        )
        .map_err(|e| sql_err(&path, e))?;
        self.wrote();
        tracing::info!(ledger = %path.display(), ledger_id = %id, "new ledger identity");
        Ok(id)
    }

    /// Regions this ledger has stamped, with the id it stamped them with.
    pub fn region_stamps(&mut self) -> Result<BTreeMap<String, String>> {
        let path = self.path().to_owned();
        let conn = self.conn_mut();
        let mut st = conn
            .prepare("SELECT region, ledger_id FROM region_stamps ORDER BY region")
            .map_err(|e| sql_err(&path, e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| sql_err(&path, e))?;
        rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()
            .map_err(|e| sql_err(&path, e))
    }

    pub fn record_stamp(&mut self, region: &str, ledger_id: &str) -> Result<()> {
        let path = self.path().to_owned();
        self.conn_mut()
            .execute(
                "INSERT INTO region_stamps (region, ledger_id) VALUES (?1, ?2)
                 ON CONFLICT(region) DO UPDATE SET ledger_id = excluded.ledger_id,
                   stamped_at = unixepoch()",
                params![region, ledger_id],
            )
            .map_err(|e| sql_err(&path, e))?;
        self.wrote();
        Ok(())
    }

    /// Drops every volume (and its intents and publications) of a region and
    /// the region's stamp record, in one transaction.
    pub fn drop_region_volumes(&mut self, region: &str) -> Result<()> {
        let path = self.path().to_owned();
        let sync = self.wal().clone();
        let tx = self
            .conn_mut()
            .transaction()
            .map_err(|e| sql_err(&path, e))?;
        tx.execute(
            "DELETE FROM publications WHERE volume_id IN (SELECT id FROM volumes WHERE region = ?1)",
            [region],
        )
        .map_err(|e| sql_err(&path, e))?;
        tx.execute("DELETE FROM volumes WHERE region = ?1", [region])
            .map_err(|e| sql_err(&path, e))?;
        tx.execute("DELETE FROM region_stamps WHERE region = ?1", [region])
            .map_err(|e| sql_err(&path, e))?;
        commit(tx, &path, &sync)
    }

    /// Copies the ledger to `dest` (a consistent snapshot, `VACUUM INTO`).
    pub fn backup_to(&mut self, dest: &std::path::Path) -> Result<()> {
        let path = self.path().to_owned();
        self.conn_mut()
            .execute("VACUUM INTO ?1", [dest.display().to_string()])
            .map_err(|e| sql_err(&path, e))?;
        // With synchronous=NORMAL sqlite need not sync the copy: the copy
        // is the way back from a rebuild, so it is made durable here.
        std::fs::File::open(dest)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("sync ledger backup {}", dest.display()), e))
    }

    /// Replaces the whole content with `volumes` (all `ready`) under
    /// `ledger_id`, with `stamped` regions recorded: the rebuild's write.
    pub fn replace_all(
        &mut self,
        ledger_id: &str,
        volumes: &[Volume],
        stamped: &[String],
    ) -> Result<()> {
        let path = self.path().to_owned();
        let sync = self.wal().clone();
        let tx = self
            .conn_mut()
            .transaction()
            .map_err(|e| sql_err(&path, e))?;
        tx.execute_batch(
            "DELETE FROM publications; DELETE FROM intents; DELETE FROM volumes;
             DELETE FROM region_stamps;",
        )
        .map_err(|e| sql_err(&path, e))?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('ledger_id', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [ledger_id],
        )
        .map_err(|e| sql_err(&path, e))?;
        for v in volumes {
            tx.execute(
                "INSERT INTO volumes (id, name, region, offset, size, requested, usage, erase_after,
                   parameters, persistency, context, state, device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, '{}', ?9, ?10, 'ready', NULL)",
                params![
                    v.id,
                    v.name,
                    v.region,
                    i64::try_from(v.offset.0).unwrap_or(i64::MAX),
                    i64::try_from(v.size.0).unwrap_or(i64::MAX),
                    i64::try_from(v.requested.0).unwrap_or(i64::MAX),
                    v.usage.as_str(),
                    v.erase_after,
                    v.persistency.as_str(),
                    serde_json::to_string(&v.context).unwrap_or_else(|_| "{}".into()),
                ],
            )
            .map_err(|e| sql_err(&path, e))?;
        }
        for r in stamped {
            tx.execute(
                "INSERT INTO region_stamps (region, ledger_id) VALUES (?1, ?2)",
                params![r, ledger_id],
            )
            .map_err(|e| sql_err(&path, e))?;
        }
        commit(tx, &path, &sync)
    }
}

/// What the open found in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub region: String,
    pub stamp: RegionStamp,
    /// Devices with our marker found in the region.
    pub ours: usize,
    /// Ledger volumes in the region.
    pub volumes: usize,
}

/// The decision at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Serve {
        /// Regions to stamp now (new ones, or all on a first start).
        stamp: Vec<String>,
        /// Lost regions with why.
        lost: BTreeMap<String, String>,
    },
    /// The ledger does not belong to these regions; why (without the hint).
    Refuse(String),
}

fn list(v: &[String]) -> String {
    v.join(", ")
}

/// Compares the ledger (`ledger_id`, the regions it has `stamped`) with what
/// the regions carry. Pure, so every case is unit-tested below.
pub fn judge(ledger_id: &str, stamped: &BTreeMap<String, String>, probes: &[Probe]) -> Verdict {
    let probes: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.stamp != RegionStamp::Unsupported)
        .collect();
    let foreign: Vec<String> = probes
        .iter()
        .filter_map(|p| match &p.stamp {
            RegionStamp::Stamped(id) if id != ledger_id => {
                Some(format!("{} (ledger {id})", p.region))
            }
            _ => None,
        })
        .collect();
    let matching = probes
        .iter()
        .any(|p| p.stamp == RegionStamp::Stamped(ledger_id.to_owned()));
    let volumes: usize = probes.iter().map(|p| p.volumes).sum();
    if stamped.is_empty() {
        // This ledger never stamped a region: it is new, was emptied or
        // re-created after a loss, or predates identities.
        if !foreign.is_empty() {
            return Verdict::Refuse(format!(
                "the ledger (id {ledger_id}) is new or was replaced: it has stamped no region, but {} carry the identity of another ledger",
                list(&foreign)
            ));
        }
        let with_devices: Vec<String> = probes
            .iter()
            .filter(|p| p.ours > 0)
            .map(|p| format!("{} ({} devices)", p.region, p.ours))
            .collect();
        if volumes == 0 && !with_devices.is_empty() {
            return Verdict::Refuse(format!(
                "the ledger (id {ledger_id}) is empty or new, but regions hold devices of ours: {}",
                list(&with_devices)
            ));
        }
        let mut lost = BTreeMap::new();
        let mut stamp = Vec::new();
        for p in &probes {
            match &p.stamp {
                RegionStamp::Missing(why) if p.volumes > 0 => {
                    lost.insert(p.region.clone(), why.clone());
                }
                RegionStamp::Missing(_) | RegionStamp::Unstamped => stamp.push(p.region.clone()),
                _ => {}
            }
        }
        return Verdict::Serve { stamp, lost };
    }
    if !matching && !foreign.is_empty() {
        return Verdict::Refuse(format!(
            "the ledger (id {ledger_id}) was replaced: no region carries its identity, but {} carry another ledger's",
            list(&foreign)
        ));
    }
    let mut lost = BTreeMap::new();
    let mut stamp = Vec::new();
    for p in &probes {
        let known = stamped.contains_key(&p.region);
        match &p.stamp {
            RegionStamp::Stamped(id) if id == ledger_id => {}
            RegionStamp::Stamped(id) => {
                lost.insert(
                    p.region.clone(),
                    format!(
                        "it carries the identity of another ledger ({id}), not this ledger's ({ledger_id}); it was replaced"
                    ),
                );
            }
            RegionStamp::Missing(why) if known || p.volumes > 0 => {
                lost.insert(p.region.clone(), why.clone());
            }
            RegionStamp::Unstamped if known => {
                lost.insert(
                    p.region.clone(),
                    "its identity stamp is gone: the region was replaced or re-created".into(),
                );
            }
            RegionStamp::Missing(_) | RegionStamp::Unstamped => stamp.push(p.region.clone()),
            RegionStamp::Unsupported => {}
        }
    }
    Verdict::Serve { stamp, lost }
}

/// What `ledger rebuild` found, and did with `applied`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub applied: bool,
    /// The identity the rebuilt ledger takes (the regions').
    pub ledger_id: String,
    /// The rows re-created (or that would be).
    pub volumes: Vec<Volume>,
    /// One line per device or region left out, and why.
    pub skipped: Vec<String>,
    /// Regions stamped with `ledger_id` afterwards.
    pub regions: Vec<String>,
    /// Where the old ledger was copied before the write.
    pub backup: Option<String>,
}

/// What `region forget` / `region reinit` dropped and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionRecovery {
    pub region: String,
    /// The ledger volumes dropped.
    pub volumes: Vec<Volume>,
    /// One line per device removed or other step.
    pub actions: Vec<String>,
}

impl RegionRecovery {
    /// One action line per dropped volume.
    fn push_dropped(&mut self) {
        for v in &self.volumes {
            self.actions
                .push(format!("dropped volume {} ({:?})", v.id, v.name));
        }
    }
}

impl Allocator {
    /// Why the ledger is refused, or `None` when it serves.
    pub fn refusal(&self) -> Option<String> {
        self.state().refusal.clone()
    }

    /// Lost regions with why.
    pub fn lost_regions(&self) -> BTreeMap<String, String> {
        self.state().lost.clone()
    }

    /// This ledger's identity.
    pub fn ledger_id(&self) -> Result<String> {
        self.state().ledger.ledger_id()
    }

    /// Fails with the refusal when the ledger is refused.
    pub(crate) fn serving(&self) -> Result<()> {
        match self.refusal() {
            Some(why) => Err(Error::FailedPrecondition(why)),
            None => Ok(()),
        }
    }

    /// Fails when the volume's region is lost.
    pub(crate) fn check_region_kept(&self, v: &Volume) -> Result<()> {
        match self.state().lost.get(&v.region) {
            Some(why) => Err(Error::FailedPrecondition(format!(
                "volume {} is lost: its region {} {why}; an operator must run `pmemctl region forget {}` (drops its volumes from the ledger) or `pmemctl region reinit {}` (erases and re-stamps it)",
                v.id, v.region, v.region, v.region
            ))),
            None => Ok(()),
        }
    }

    fn probes(&self) -> Result<(Vec<Probe>, Vec<InventoryItem>)> {
        let specs: Vec<String> = self.state().regions.keys().cloned().collect();
        // The maps were rebuilt from the ledger: count there, not in rows.
        let per_region = self.volumes_per_region();
        let mut stamps = BTreeMap::new();
        // One fresh read of the devices for all regions (lvm: one report).
        self.backend().refresh();
        for r in &specs {
            stamps.insert(r.clone(), self.backend().region_stamp(r)?);
        }
        let inventory: Vec<InventoryItem> = self
            .backend()
            .inventory()?
            .into_iter()
            .filter(|i| matches!(i.owner, Owner::Ours(_)))
            .collect();
        let probes = specs
            .iter()
            .map(|r| Probe {
                region: r.clone(),
                stamp: stamps.remove(r).unwrap_or(RegionStamp::Unsupported),
                ours: inventory.iter().filter(|i| &i.region == r).count(),
                volumes: per_region.get(r).copied().unwrap_or(0),
            })
            .collect();
        Ok((probes, inventory))
    }

    /// Judges the identity and applies the verdict: stamps, lost regions or
    /// the refusal (with `reinitialize`: erases and starts empty instead).
    pub(crate) fn check_identity(&self, reinitialize: bool) -> Result<()> {
        let (probes, _) = self.probes()?;
        let (ledger_id, stamped) = {
            let mut st = self.state();
            (st.ledger.ledger_id()?, st.ledger.region_stamps()?)
        };
        // A new identity is durable before any region carries it.
        self.sync_ledger()?;
        self.backend().set_ledger_id(&ledger_id);
        match judge(&ledger_id, &stamped, &probes) {
            Verdict::Refuse(why) if reinitialize => {
                tracing::error!(reason = %why, "--reinitialize: ERASING EVERY REGION; all volumes and their data are gone");
                self.reinitialize_all(&ledger_id)
            }
            Verdict::Refuse(why) => {
                let msg = format!("{why}; {RECOVERY_HINT}");
                tracing::error!(ledger = %self.ledger_path().display(), "ledger refused: {msg}");
                let mut st = self.state();
                st.refusal = Some(msg);
                st.lost.clear();
                Ok(())
            }
            Verdict::Serve { stamp, mut lost } => {
                if reinitialize {
                    tracing::warn!(
                        "--reinitialize ignored: the ledger and the regions agree (it only acts on a refused ledger)"
                    );
                }
                let stamped_any = !stamp.is_empty();
                for r in stamp {
                    match self.backend().stamp_region(&r, &ledger_id) {
                        Ok(()) => {
                            self.state().ledger.record_stamp(&r, &ledger_id)?;
                            tracing::info!(region = %r, ledger_id = %ledger_id, "region stamped with the ledger's identity");
                        }
                        Err(e) => {
                            tracing::error!(region = %r, error = %e, "cannot stamp region; it serves nothing");
                            lost.insert(
                                r,
                                format!("cannot be stamped with the ledger's identity: {e}"),
                            );
                        }
                    }
                }
                if stamped_any {
                    self.sync_ledger()?;
                    // A stamp may take space (direct: the identity namespace).
                    self.refresh_reserved()?;
                }
                for (r, why) in &lost {
                    let n = probes
                        .iter()
                        .find(|p| &p.region == r)
                        .map_or(0, |p| p.volumes);
                    tracing::error!(region = %r, volumes = n, "region lost: {why}; its volumes are reported lost until `pmemctl region forget {r}` or `pmemctl region reinit {r}`");
                }
                let mut st = self.state();
                st.refusal = None;
                st.lost = lost;
                Ok(())
            }
        }
    }

    /// `--reinitialize`: every region erased and stamped, the ledger emptied.
    fn reinitialize_all(&self, ledger_id: &str) -> Result<()> {
        let all: Vec<String> = self.state().regions.keys().cloned().collect();
        let mut regions = Vec::new();
        self.backend().refresh();
        for r in all {
            // Regions that keep no identity hold no volume (direct: label-less).
            if self.backend().region_stamp(&r)? != RegionStamp::Unsupported {
                regions.push(r);
            }
        }
        for r in &regions {
            for line in self.backend().reinit_region(r, ledger_id)? {
                tracing::warn!(region = %r, "--reinitialize: {line}");
            }
        }
        {
            let mut st = self.state();
            st.ledger.replace_all(ledger_id, &[], &regions)?;
            let specs = self.backend().regions()?;
            st.load(self.backend().as_ref(), specs)?;
        }
        self.sync_ledger()?;
        tracing::warn!(regions = ?regions, ledger_id, "--reinitialize: regions erased and re-stamped; the ledger is empty");
        self.check_identity(false)
    }

    /// Re-creates ledger rows from the markers of our devices (a dry run
    /// unless `apply`). Only for a refused ledger. The rebuilt ledger takes
    /// the identity most regions carry; regions with another identity stay
    /// out (lost afterwards). Rows get the volume id as name, eraseAfter,
    /// persistency persistent, and the context key [`REBUILT_KEY`].
    pub fn rebuild_ledger(&self, apply: bool) -> Result<RebuildReport> {
        let Some(why) = self.refusal() else {
            return Err(Error::FailedPrecondition(
                "the ledger is not refused (it and the regions agree): there is nothing to rebuild; devices of ours without a ledger row are orphans (pmemctl orphans)".into(),
            ));
        };
        let (probes, inventory) = self.probes()?;
        let own = self.ledger_id()?;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &probes {
            if let RegionStamp::Stamped(id) = &p.stamp {
                *counts.entry(id.as_str()).or_default() += 1;
            }
        }
        let adopted = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or(own.clone(), |(id, _)| (*id).to_owned());
        let mut rep = RebuildReport {
            applied: apply,
            ledger_id: adopted.clone(),
            ..RebuildReport::default()
        };
        let mut taken: BTreeSet<String> = BTreeSet::new();
        for p in &probes {
            match &p.stamp {
                RegionStamp::Stamped(id) if *id == adopted => {}
                RegionStamp::Unstamped => {}
                // Keeps no identity (direct: label-less), so holds no volume.
                RegionStamp::Unsupported => continue,
                RegionStamp::Stamped(id) => {
                    rep.skipped.push(format!(
                        "region {}: carries another ledger's identity ({id}); it stays lost until `pmemctl region reinit {}`",
                        p.region, p.region
                    ));
                    continue;
                }
                RegionStamp::Missing(m) => {
                    rep.skipped.push(format!("region {}: {m}", p.region));
                    continue;
                }
            }
            taken.insert(p.region.clone());
            rep.regions.push(p.region.clone());
        }
        let specs: BTreeMap<String, crate::region::RegionSpec> = self
            .state()
            .regions
            .iter()
            .map(|(k, r)| (k.clone(), r.spec.clone()))
            .collect();
        let mut placed: Vec<(String, Bytes, Bytes)> = Vec::new();
        let pooled = self.backend().placement() == crate::backend::Placement::Pooled;
        for item in &inventory {
            let Owner::Ours(id) = &item.owner else {
                continue;
            };
            if !taken.contains(&item.region) {
                continue;
            }
            let Some(spec) = specs.get(&item.region) else {
                continue;
            };
            if self.backend().is_retired(item) {
                rep.skipped.push(format!(
                    "device {} (volume {id}) in {}: a deleted volume whose erase was interrupted; it stays reserved as an orphan, and `pmemctl reconcile --apply --remove-orphans` zeroes and removes it",
                    item.path, item.region
                ));
                continue;
            }
            let overlaps = !pooled
                && placed.iter().any(|(r, o, l)| {
                    *r == item.region && *o < item.offset + item.size && item.offset < *o + *l
                });
            if rep.volumes.iter().any(|v| &v.id == id) || overlaps {
                rep.skipped.push(format!(
                    "device {} (volume {id}) at {}+{} of {}: overlaps another device or repeats a volume id",
                    item.path, item.offset.0, item.size.0, item.region
                ));
                continue;
            }
            if !item.offset.is_aligned(spec.align) || !item.size.is_aligned(spec.align) {
                rep.skipped.push(format!(
                    "device {} (volume {id}): extent {}+{} is not aligned to {} of region {}",
                    item.path, item.offset.0, item.size.0, spec.align, item.region
                ));
                continue;
            }
            let usage = self.backend().recovered_usage(item);
            placed.push((item.region.clone(), item.offset, item.size));
            rep.volumes.push(Volume {
                id: id.clone(),
                name: id.clone(),
                region: item.region.clone(),
                offset: item.offset,
                size: item.size,
                requested: self.backend().usable_for(spec, item.size, usage),
                usage,
                erase_after: true,
                parameters: BTreeMap::new(),
                persistency: Persistency::Persistent,
                context: BTreeMap::from([(REBUILT_KEY.to_owned(), "true".to_owned())]),
                state: VolumeState::Ready,
                // Reconciliation records the device node it finds.
                device: None,
                seq: 0,
            });
        }
        if !apply {
            return Ok(rep);
        }
        tracing::warn!(reason = %why, volumes = rep.volumes.len(), ledger_id = %adopted, "rebuilding the ledger from the devices' markers");
        for r in &rep.regions {
            if probes
                .iter()
                .any(|p| &p.region == r && p.stamp != RegionStamp::Stamped(adopted.clone()))
            {
                self.backend().stamp_region(r, &adopted)?;
            }
        }
        {
            let mut st = self.state();
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut backup = st.ledger.path().as_os_str().to_owned();
            backup.push(format!(".before-rebuild-{stamp}"));
            let backup = std::path::PathBuf::from(backup);
            st.ledger.backup_to(&backup)?;
            rep.backup = Some(backup.display().to_string());
            st.ledger
                .replace_all(&adopted, &rep.volumes, &rep.regions)?;
            let specs = self.backend().regions()?;
            st.load(self.backend().as_ref(), specs)?;
        }
        self.sync_ledger()?;
        // Space no recovered volume holds may hold a lost volume's data.
        for r in &rep.regions {
            let free: Vec<(Bytes, Bytes)> = self.state().regions.get(r).map_or(Vec::new(), |s| {
                s.map
                    .extents()
                    .into_iter()
                    .filter(|slot| !slot.used)
                    .map(|slot| (slot.extent.offset, slot.extent.len))
                    .collect()
            });
            self.backend().scrub_free(r, &free)?;
        }
        self.check_identity(false)?;
        tracing::warn!(volumes = rep.volumes.len(), backup = ?rep.backup, "ledger rebuilt");
        Ok(rep)
    }

    fn lost_reason(&self, region: &str) -> Result<String> {
        self.serving()?;
        let st = self.state();
        if !st.regions.contains_key(region) {
            return Err(Error::NotFound(format!("region {region} does not exist")));
        }
        st.lost.get(region).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "region {region} is not lost (its identity matches the ledger); refusing to drop or erase its volumes"
            ))
        })
    }

    /// Drops a lost region's volumes from the ledger (devices untouched),
    /// and stamps the region again when it carries no other ledger's
    /// identity (sim: a new, empty region file), so it serves again.
    pub fn forget_region(&self, region: &str) -> Result<RegionRecovery> {
        let why = self.lost_reason(region)?;
        let volumes = self.region_volumes(region)?;
        let mut rec = RegionRecovery {
            region: region.to_owned(),
            volumes,
            actions: Vec::new(),
        };
        for v in &rec.volumes {
            tracing::warn!(region, volume = %v.id, name = %v.name, "region forget: dropping lost volume from the ledger");
        }
        rec.push_dropped();
        {
            let mut st = self.state();
            st.ledger.drop_region_volumes(region)?;
            let specs = self.backend().regions()?;
            st.load(self.backend().as_ref(), specs)?;
        }
        self.sync_ledger()?;
        tracing::warn!(region, reason = %why, volumes = rec.volumes.len(), "region forgotten");
        // A region that is there but unstamped (replaced, re-created) is
        // stamped again below: first zero its free space, which may hold
        // whatever the replacement brought (never handed to a tenant).
        self.backend().refresh();
        if self.backend().region_stamp(region)? == RegionStamp::Unstamped {
            let free: Vec<(Bytes, Bytes)> =
                self.state().regions.get(region).map_or(Vec::new(), |s| {
                    s.map
                        .extents()
                        .into_iter()
                        .filter(|slot| !slot.used)
                        .map(|slot| (slot.extent.offset, slot.extent.len))
                        .collect()
                });
            self.backend().scrub_free(region, &free)?;
            rec.actions
                .push(format!("zeroed the free space of region {region}"));
        }
        self.reload()?;
        if let Some(still) = self.state().lost.get(region) {
            rec.actions.push(format!(
                "region {region} is still lost: {still}; `pmemctl region reinit {region}` erases and re-stamps it"
            ));
        } else {
            rec.actions
                .push(format!("region {region} stamped again and serving"));
        }
        Ok(rec)
    }

    /// Erases a lost region (our devices removed with their data, the rest
    /// zeroed where reachable), drops its volumes and stamps it anew.
    pub fn reinit_region(&self, region: &str) -> Result<RegionRecovery> {
        let why = self.lost_reason(region)?;
        let ledger_id = self.ledger_id()?;
        let volumes = self.region_volumes(region)?;
        tracing::warn!(region, reason = %why, volumes = volumes.len(), "region reinit: ERASING the region; its data is gone");
        let actions = self.backend().reinit_region(region, &ledger_id)?;
        {
            let mut st = self.state();
            st.ledger.drop_region_volumes(region)?;
            st.ledger.record_stamp(region, &ledger_id)?;
        }
        self.sync_ledger()?;
        let mut rec = RegionRecovery {
            region: region.to_owned(),
            volumes,
            actions,
        };
        rec.push_dropped();
        self.reload()?;
        Ok(rec)
    }

    /// The ledger's volumes on one region.
    fn region_volumes(&self, region: &str) -> Result<Vec<Volume>> {
        Ok(self
            .volumes()?
            .into_iter()
            .filter(|v| v.region == region)
            .collect())
    }

    /// Re-reads regions, maps and identities after a recovery step.
    fn reload(&self) -> Result<()> {
        let specs = self.backend().regions()?;
        {
            let mut st = self.state();
            st.ledger.sync_regions(self.backend().kind(), &specs)?;
            st.load(self.backend().as_ref(), specs)?;
        }
        self.sync_ledger()?;
        self.check_identity(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(region: &str, stamp: RegionStamp, ours: usize, volumes: usize) -> Probe {
        Probe {
            region: region.into(),
            stamp,
            ours,
            volumes,
        }
    }

    fn st(id: &str) -> RegionStamp {
        RegionStamp::Stamped(id.into())
    }

    /// The verdict of a ledger that recorded no stamps yet.
    fn judge_unstamped(ledger: &str, probes: &[Probe]) -> Verdict {
        judge(ledger, &BTreeMap::new(), probes)
    }

    fn serve(stamp: &[&str], lost: &[(&str, &str)]) -> Verdict {
        Verdict::Serve {
            stamp: stamp.iter().map(|r| (*r).to_owned()).collect(),
            lost: lost
                .iter()
                .map(|(r, why)| ((*r).to_owned(), (*why).to_owned()))
                .collect(),
        }
    }

    fn stamped(rs: &[&str]) -> BTreeMap<String, String> {
        rs.iter()
            .map(|r| ((*r).to_owned(), "L".to_owned()))
            .collect()
    }

    #[test]
    fn first_start_on_clean_regions_stamps_them_all() {
        let v = judge_unstamped(
            "L",
            &[
                probe("r0", RegionStamp::Unstamped, 0, 0),
                probe("r1", RegionStamp::Missing("no file".into()), 0, 0),
            ],
        );
        assert_eq!(v, serve(&["r0", "r1"], &[]));
    }

    #[test]
    fn empty_ledger_over_stamped_or_used_regions_is_refused() {
        let v = judge_unstamped(
            "L2",
            &[probe("r0", st("L"), 1, 0), probe("r1", st("L"), 0, 0)],
        );
        assert!(
            matches!(&v, Verdict::Refuse(m) if m.contains("r0 (ledger L)")),
            "{v:?}"
        );
        // No stamps (a ledger lost before identities existed) but our devices.
        let v = judge_unstamped("L2", &[probe("r0", RegionStamp::Unstamped, 2, 0)]);
        assert!(
            matches!(&v, Verdict::Refuse(m) if m.contains("r0 (2 devices)")),
            "{v:?}"
        );
    }

    #[test]
    fn ledger_from_before_identities_is_adopted() {
        let v = judge_unstamped(
            "L",
            &[
                probe("r0", RegionStamp::Unstamped, 2, 2),
                probe("r1", RegionStamp::Missing("gone".into()), 0, 1),
            ],
        );
        assert_eq!(v, serve(&["r0"], &[("r1", "gone")]));
    }

    #[test]
    fn replaced_ledger_is_refused() {
        let v = judge(
            "L2",
            &stamped(&["r0"]),
            &[probe("r0", st("L"), 0, 0), probe("r1", st("L"), 0, 0)],
        );
        assert!(
            matches!(&v, Verdict::Refuse(m) if m.contains("replaced")),
            "{v:?}"
        );
    }

    #[test]
    fn one_region_gone_or_replaced_is_lost_the_others_serve() {
        let v = judge(
            "L",
            &stamped(&["r0", "r1", "r2"]),
            &[
                probe(
                    "r0",
                    RegionStamp::Missing("region file is gone".into()),
                    0,
                    1,
                ),
                probe("r1", st("L"), 1, 1),
                probe("r2", st("X"), 0, 0),
                probe("r3", RegionStamp::Unstamped, 0, 0),
            ],
        );
        let Verdict::Serve { stamp, lost } = v else {
            panic!("{v:?}")
        };
        assert_eq!(stamp, vec!["r3".to_owned()]);
        assert_eq!(lost.len(), 2);
        assert_eq!(lost["r0"], "region file is gone");
        assert!(lost["r2"].contains("another ledger (X)"));
        // A re-created region without its stamp is lost too.
        let v = judge(
            "L",
            &stamped(&["r0", "r1"]),
            &[
                probe("r0", RegionStamp::Unstamped, 0, 0),
                probe("r1", st("L"), 0, 0),
            ],
        );
        assert!(
            matches!(&v, Verdict::Serve { lost, .. } if lost["r0"].contains("stamp is gone")),
            "{v:?}"
        );
    }

    #[test]
    fn backends_without_identity_are_never_refused() {
        let v = judge_unstamped("L", &[probe("r0", RegionStamp::Unsupported, 3, 0)]);
        assert_eq!(v, serve(&[], &[]));
    }
}

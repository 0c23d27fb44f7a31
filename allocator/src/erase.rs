//! The background eraser: zeroes the extents of deleted volumes, so that no
//! volume ever exposes bytes a previous volume wrote.
//!
//! DeleteVolume only retires the device (the tenant's block device is gone,
//! the device layer still holds the extent) and records the volume as
//! `erasing`; it returns within seconds at any size. The eraser then zeroes
//! and verifies the extent ([`Backend::erase`](crate::Backend::erase)),
//! destroys what is left of the device and removes the row, which frees the
//! extent. Until then the row keeps the extent out of capacity.
//!
//! The work list is the ledger's `erasing` rows, so an erase interrupted by
//! a crash or a restart is simply done again (erasing is idempotent). One
//! worker thread per allocator owner ([`Allocator::start_eraser`]); tests
//! and tools can drain the list synchronously ([`Allocator::erase_pending`]).
//! Failures are logged and retried after [`RETRY`].
//!
//! Batches: the worker lingers up to [`LINGER`] after the first delete (or
//! until [`BATCH_VOLUMES`] deletes arrived), then erases up to
//! [`BATCH_VOLUMES`] volumes or [`BATCH_BYTES`] at a time: every extent is
//! zeroed, the zeros of the batch are made durable with one data sync per
//! region file or device ([`Backend::sync_erased`](crate::Backend::sync_erased)),
//! the devices are destroyed, and one transaction removes all their rows.
//! That removal is not synced itself (a lost one is redone: the rows are
//! still `erasing`); it only becomes durable after the zeros are, so a power
//! loss never leaves a free extent with its old bytes back.
//!
//! Zeroing is skipped only where the node is declared single-tenant
//! ([`ErasePolicy::allow_unerased_reuse`]) and the volume asked for no erase
//! (`eraseAfter=false`); otherwise `eraseAfter=false` changes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::allocator::{Allocator, device_request};
use crate::error::{Error, Result};
use crate::units::Bytes;
use crate::volume::{Volume, VolumeState};

/// Name prefix of a volume being erased: its CSI name is given back when
/// DeleteVolume returns (clients cannot create names with this prefix).
pub const ERASING_NAME: &str = "erasing:";

/// How long the worker waits before retrying erases that failed.
pub const RETRY: Duration = Duration::from_secs(30);
/// Longest sleep between two checks of the stop flag while pacing.
const NAP: Duration = Duration::from_millis(100);
/// How long the worker waits after a delete for more, so one sync serves
/// many erases.
pub const LINGER: Duration = Duration::from_millis(500);
/// Most volumes in one erase batch.
pub const BATCH_VOLUMES: usize = 256;
/// A batch closes once its extents reach this many bytes (at least one
/// volume): a big erase does not hold back the small ones after it.
pub const BATCH_BYTES: u64 = 4 << 30;

/// What deleting a volume erases, and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErasePolicy {
    /// The node is single-tenant: a volume created with `eraseAfter=false`
    /// is not zeroed at delete, and the next volume may see its bytes.
    pub allow_unerased_reuse: bool,
    /// Upper bound of the zeroing rate, bytes per second (`None`: as fast as
    /// the device goes), so a large erase does not starve the tenants'
    /// memory bandwidth.
    pub rate: Option<Bytes>,
}

impl ErasePolicy {
    /// Whether deleting `v` zeroes its extent.
    pub fn erases(&self, v: &Volume) -> bool {
        v.erase_after || !self.allow_unerased_reuse
    }
}

/// What the eraser has left to do and has done (metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EraseStats {
    /// Volumes recorded as `erasing`.
    pub volumes: u64,
    /// Bytes of those extents not yet zeroed.
    pub pending_bytes: u64,
    /// Bytes erased (and freed) since this process started.
    pub erased_bytes_total: u64,
}

#[derive(Debug, Default)]
struct Signal {
    /// Deletes since the worker last looked.
    kicked: usize,
    /// Someone waits for the erase (an in-place growth): no linger.
    urgent: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    signal: Mutex<Signal>,
    wake: Condvar,
    stopping: AtomicBool,
}

/// The allocator's eraser state (a field of [`Allocator`]).
#[derive(Debug, Default)]
pub struct Eraser {
    shared: Arc<Shared>,
    policy: Mutex<ErasePolicy>,
    /// Volumes being erased now, with the bytes zeroed so far.
    running: Mutex<HashMap<String, u64>>,
    erased: AtomicU64,
    /// Batches whose zeros were synced.
    syncs: AtomicU64,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Eraser {
    pub fn policy(&self) -> ErasePolicy {
        *relock(&self.policy)
    }

    /// Wakes the worker: there is (new) work.
    pub fn kick(&self) {
        let mut sig = relock(&self.shared.signal);
        sig.kicked = sig.kicked.saturating_add(1);
        drop(sig);
        self.shared.wake.notify_all();
    }

    /// Wakes the worker and ends its linger: a caller waits for the erase.
    pub fn hurry(&self) {
        let mut sig = relock(&self.shared.signal);
        sig.kicked = sig.kicked.saturating_add(1);
        sig.urgent = true;
        drop(sig);
        self.shared.wake.notify_all();
    }

    /// Data syncs of erase batches so far (instrumentation).
    pub fn batch_syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        relock(&self.shared.signal).stop = true;
        self.shared.wake.notify_all();
    }
}

impl Drop for Eraser {
    fn drop(&mut self) {
        // The worker holds only a weak reference between erases; it sees
        // the flag (or the dead allocator) and ends.
        self.stop();
    }
}

/// Removes a volume from the running set when its erase ends, also by panic.
struct Claim<'a> {
    eraser: &'a Eraser,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        relock(&self.eraser.running).remove(&self.id);
    }
}

impl Allocator {
    /// Sets what deletes erase; call before serving.
    pub fn set_erase_policy(&self, policy: ErasePolicy) {
        *relock(&self.eraser().policy) = policy;
    }

    pub fn erase_policy(&self) -> ErasePolicy {
        self.eraser().policy()
    }

    /// Starts the background worker (once). It erases the ledger's `erasing`
    /// rows, those left by an earlier run first.
    pub fn start_eraser(self: &Arc<Self>) -> Result<()> {
        let mut worker = relock(&self.eraser().worker);
        if worker.is_some() {
            return Ok(());
        }
        let weak: Weak<Allocator> = Arc::downgrade(self);
        let shared = Arc::clone(&self.eraser().shared);
        let handle = std::thread::Builder::new()
            .name("pmem-eraser".into())
            .spawn(move || worker_loop(&weak, &shared))
            .map_err(|e| Error::io("start the eraser thread", e))?;
        *worker = Some(handle);
        drop(worker);
        self.eraser().kick();
        Ok(())
    }

    /// Stops the worker after the chunk it is zeroing (the erase is resumed
    /// at the next start) and waits for it to end.
    pub fn stop_eraser(&self) {
        self.eraser().stop();
        if let Some(h) = relock(&self.eraser().worker).take()
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }

    /// Erases every `erasing` volume now, on this thread, in batches (the
    /// worker calls it too; a volume already being erased elsewhere is
    /// skipped). Returns how many were erased; the first failure is
    /// returned after the others were tried.
    pub fn erase_pending(&self) -> Result<usize> {
        let mut done = 0;
        let mut first_err = None;
        // A refused ledger may be another node's or an old copy: its rows
        // say nothing about these regions, so nothing is zeroed until an
        // operator has recovered it.
        if self.refusal().is_some() {
            return Ok(0);
        }
        let erasing = self.state().ledger.volumes_in(VolumeState::Erasing)?;
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        for v in erasing {
            // A lost region's devices are not ours to touch (forget or
            // reinit decides); its erasing rows wait.
            if self.check_region_kept(&v).is_err() {
                continue;
            }
            bytes = bytes.saturating_add(v.size.0);
            batch.push(v);
            if batch.len() >= BATCH_VOLUMES || bytes >= BATCH_BYTES {
                done += self.erase_batch(std::mem::take(&mut batch), &mut first_err);
                bytes = 0;
            }
            if self.eraser().stopping() {
                batch.clear();
                break;
            }
        }
        if !batch.is_empty() {
            done += self.erase_batch(batch, &mut first_err);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Pending and finished erase work.
    pub fn erase_stats(&self) -> Result<EraseStats> {
        let vols = self.state().ledger.volumes_in(VolumeState::Erasing)?;
        let running = relock(&self.eraser().running).clone();
        let mut st = EraseStats {
            erased_bytes_total: self.eraser().erased.load(Ordering::Relaxed),
            ..EraseStats::default()
        };
        for v in &vols {
            st.volumes += 1;
            let done = running.get(&v.id).copied().unwrap_or(0);
            st.pending_bytes += v.size.0.saturating_sub(done);
        }
        Ok(st)
    }

    /// Zeroes the extents of `batch`, makes the zeros durable (one sync per
    /// region file or device), destroys the devices and removes the rows in
    /// one transaction. Returns how many were erased and freed; failures go
    /// to the log and `first_err`, their volumes stay `erasing`.
    fn erase_batch(&self, batch: Vec<Volume>, first_err: &mut Option<Error>) -> usize {
        let eraser = self.eraser();
        let mut fail = |v: &Volume, e: Error| {
            tracing::error!(volume = %v.id, region = %v.region, offset = v.offset.0, size = v.size.0, error = %e, "erase failed; the extent stays reserved and the erase is retried");
            first_err.get_or_insert(e);
        };
        let rate = eraser.policy().rate.filter(|r| r.0 > 0);
        let t0 = Instant::now();
        let mut zeroed_all = 0u64;
        let mut claims = Vec::new();
        let mut zeroed: Vec<Volume> = Vec::new();
        for v in batch {
            if eraser.stopping() {
                break;
            }
            {
                let mut running = relock(&eraser.running);
                if running.contains_key(&v.id) {
                    continue;
                }
                running.insert(v.id.clone(), 0);
            }
            let claim = Claim {
                eraser,
                id: v.id.clone(),
            };
            // Re-read: a concurrent erase may have finished it before the claim.
            let v = match self.volume(&v.id) {
                Ok(Some(v)) if v.state == VolumeState::Erasing => v,
                Ok(_) => continue,
                Err(e) => {
                    fail(&v, e);
                    continue;
                }
            };
            let req = device_request(&v);
            let mut mine = 0u64;
            tracing::info!(volume = %v.id, region = %v.region, offset = v.offset.0, size = v.size.0, "erasing the extent of a deleted volume");
            let r = self.backend().erase(&req, &mut |n| {
                mine += n;
                zeroed_all += n;
                if let Some(r) = relock(&eraser.running).get_mut(&v.id) {
                    *r = mine.min(v.size.0);
                }
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64(zeroed_all as f64 / rate.0 as f64);
                    while t0.elapsed() < due && !eraser.stopping() {
                        std::thread::sleep(due.saturating_sub(t0.elapsed()).min(NAP));
                    }
                }
                if eraser.stopping() {
                    return Err(Error::Busy(format!(
                        "erase of volume {} interrupted by shutdown after {mine} bytes; it resumes at the next start",
                        v.id
                    )));
                }
                Ok(())
            });
            match r {
                Ok(()) => {
                    claims.push(claim);
                    zeroed.push(v);
                }
                Err(e) => fail(&v, e),
            }
        }
        if zeroed.is_empty() {
            return 0;
        }
        let reqs: Vec<_> = zeroed.iter().map(device_request).collect();
        if let Err(e) = self.backend().sync_erased(&reqs) {
            for v in &zeroed {
                tracing::error!(volume = %v.id, region = %v.region, error = %e, "erase not made durable; the extent stays reserved and the erase is retried");
            }
            first_err.get_or_insert(e);
            return 0;
        }
        eraser.syncs.fetch_add(1, Ordering::Relaxed);
        fail::fail_point!("delete:after-erase");
        let mut freed = Vec::new();
        for (v, req) in zeroed.into_iter().zip(&reqs) {
            match self.backend().destroy(req) {
                Ok(()) => freed.push(v),
                Err(e) => fail(&v, e),
            }
        }
        let bytes: u64 = freed.iter().map(|v| v.size.0).sum();
        // Counted before the rows go, so a reader never sees one gone uncounted.
        eraser.erased.fetch_add(bytes, Ordering::Relaxed);
        if let Err(e) = self.forget_all(&freed) {
            eraser.erased.fetch_sub(bytes, Ordering::Relaxed);
            tracing::error!(volumes = freed.len(), error = %e, "erased extents not recorded as free; retried");
            first_err.get_or_insert(e);
            return 0;
        }
        for v in &freed {
            tracing::info!(volume = %v.id, region = %v.region, bytes = v.size.0, "extent erased and free");
        }
        tracing::debug!(
            volumes = freed.len(),
            bytes,
            ms = t0.elapsed().as_millis() as u64,
            "erase batch done"
        );
        drop(claims);
        freed.len()
    }
}

fn worker_loop(weak: &Weak<Allocator>, shared: &Shared) {
    let mut retry_at: Option<Instant> = None;
    loop {
        {
            let mut sig = relock(&shared.signal);
            loop {
                if sig.stop {
                    return;
                }
                if sig.kicked > 0 || retry_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                let wait = retry_at.map_or(RETRY, |t| t.saturating_duration_since(Instant::now()));
                sig = shared
                    .wake
                    .wait_timeout(sig, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // Linger for more deletes, so one sync serves the batch.
        {
            let until = Instant::now() + LINGER;
            let mut sig = relock(&shared.signal);
            while !sig.stop && !sig.urgent && sig.kicked < BATCH_VOLUMES {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sig = shared
                    .wake
                    .wait_timeout(sig, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if sig.stop {
                return;
            }
            sig.kicked = 0;
            sig.urgent = false;
        }
        let Some(a) = weak.upgrade() else {
            return;
        };
        retry_at = match a.erase_pending() {
            Ok(_) => None,
            Err(_) if shared.stopping.load(Ordering::Relaxed) => return,
            Err(_) => Some(Instant::now() + RETRY),
        };
        drop(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateRequest;
    use crate::allocator::hook_tests::{A, Fake};
    use crate::backend::{Backend, Device, DeviceRequest, InventoryItem, Progress};
    use crate::region::RegionSpec;

    /// A backend of one 4 × A region whose erases can be held until
    /// released; devices and the call log are [`Fake`]'s.
    #[derive(Debug, Default)]
    struct Slow {
        fake: Fake,
        hold: Mutex<bool>,
        released: Condvar,
        fail_erase: AtomicBool,
    }

    impl Slow {
        fn calls(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
            relock(&self.fake.calls)
        }
        fn release(&self) {
            *relock(&self.hold) = false;
            self.released.notify_all();
        }
    }

    impl Backend for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        fn describe(&self) -> String {
            "slow".into()
        }
        fn regions(&self) -> Result<Vec<RegionSpec>> {
            Ok(vec![RegionSpec {
                id: "r0".into(),
                size: Bytes(4 * A),
                align: Bytes(A),
                ns_slots: 10,
                numa_node: 0,
                location: String::new(),
            }])
        }
        fn create(&self, req: &DeviceRequest) -> Result<Device> {
            self.fake.create(req)
        }
        fn find(&self, req: &DeviceRequest) -> Result<Option<Device>> {
            self.fake.find(req)
        }
        fn destroy(&self, req: &DeviceRequest) -> Result<()> {
            self.fake.destroy(req)
        }
        fn retire(&self, req: &DeviceRequest) -> Result<()> {
            self.fake.retire(req)
        }
        fn sync_erased(&self, erased: &[DeviceRequest]) -> Result<()> {
            self.fake.sync_erased(erased)
        }
        fn erase(&self, req: &DeviceRequest, progress: Progress<'_>) -> Result<()> {
            self.fake.log("erase", req);
            let mut h = relock(&self.hold);
            while *h {
                h = self.released.wait(h).unwrap_or_else(|e| e.into_inner());
            }
            drop(h);
            if self.fail_erase.load(Ordering::Relaxed) {
                return Err(Error::Device("media error".into()));
            }
            progress(req.size.0 / 2)?;
            progress(req.size.0 - req.size.0 / 2)
        }
        fn resize(&self, req: &DeviceRequest) -> Result<Device> {
            self.fake.resize(req)
        }
        fn inventory(&self) -> Result<Vec<InventoryItem>> {
            self.fake.inventory()
        }
        fn remove_orphan(&self, item: &InventoryItem) -> Result<()> {
            self.fake.remove_orphan(item)
        }
    }

    fn open(dir: &tempfile::TempDir, b: &Arc<Slow>) -> Arc<Allocator> {
        Arc::new(Allocator::open(&dir.path().join("ledger.db"), b.clone()).unwrap())
    }

    fn avail(a: &Allocator) -> Bytes {
        a.capacity(crate::Usage::AppDirect).unwrap()[0].available
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn growth_into_an_extent_being_erased_waits_for_the_eraser() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Slow::default());
        let a = open(&dir, &b);
        a.start_eraser().unwrap();
        let v = a.create_volume(&CreateRequest::new("v", Bytes(A))).unwrap();
        let w = a.create_volume(&CreateRequest::new("w", Bytes(A))).unwrap();
        assert_eq!((v.offset, w.offset), (Bytes(0), Bytes(A)));
        *relock(&b.hold) = true;
        a.delete_volume(&w.id).unwrap();
        wait_until("the erase to start", || {
            b.calls().iter().any(|c| c.starts_with("erase"))
        });
        let grower = {
            let a = Arc::clone(&a);
            let id = v.id.clone();
            std::thread::spawn(move || a.expand_volume(&id, Bytes(2 * A), None))
        };
        // The growth waits (it hurried the eraser) while w's extent is
        // being erased, then fits.
        wait_until("the growth to wait for the erase", || {
            relock(&a.eraser().shared.signal).urgent
        });
        assert!(!grower.is_finished(), "growth did not wait for the erase");
        b.release();
        let grown = grower.join().unwrap().unwrap();
        assert_eq!(grown.size, Bytes(2 * A));
        assert!(a.volume(&w.id).unwrap().is_none());
    }

    #[test]
    fn delete_returns_before_the_erase_and_the_extent_stays_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Slow::default());
        *relock(&b.hold) = true;
        let a = open(&dir, &b);
        a.start_eraser().unwrap();
        let v = a
            .create_volume(&CreateRequest::new("v", Bytes(2 * A)))
            .unwrap();
        a.delete_volume(&v.id).unwrap();
        // DeleteVolume is back; the erase is held in the backend.
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().state,
            VolumeState::Erasing
        );
        wait_until("the erase to start", || {
            b.calls().iter().any(|c| c == "erase 0")
        });
        assert_eq!(avail(&a), Bytes(2 * A), "erasing extent counted as free");
        let st = a.erase_stats().unwrap();
        assert_eq!((st.volumes, st.pending_bytes), (1, 2 * A));
        // A second delete is idempotent and does not wait either.
        a.delete_volume(&v.id).unwrap();
        // The name is free again: a new volume, elsewhere.
        let w = a.create_volume(&CreateRequest::new("v", Bytes(A))).unwrap();
        assert_ne!(w.id, v.id);
        assert_eq!(w.offset, Bytes(2 * A));
        let e = a
            .create_volume(&CreateRequest::new(format!("{ERASING_NAME}x"), Bytes(A)))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        b.release();
        wait_until("the erase to finish", || a.volume(&v.id).unwrap().is_none());
        assert_eq!(avail(&a), Bytes(3 * A));
        a.delete_volume(&w.id).unwrap();
        wait_until("the second erase", || a.volume(&w.id).unwrap().is_none());
        assert_eq!(avail(&a), Bytes(4 * A));
        let st = a.erase_stats().unwrap();
        assert_eq!(
            (st.volumes, st.pending_bytes, st.erased_bytes_total),
            (0, 0, 3 * A)
        );
        assert_eq!(
            *b.calls(),
            [
                "create 0",
                "retire 0",
                "erase 0",
                "create 2",
                "destroy 0",
                "retire 2",
                "erase 2",
                "destroy 2"
            ]
        );
        a.check_invariants().unwrap();
        a.stop_eraser();
    }

    #[test]
    fn erase_after_false_erases_unless_the_node_is_single_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Slow::default());
        let a = open(&dir, &b);
        let keep = CreateRequest {
            erase_after: false,
            ..CreateRequest::new("k", Bytes(A))
        };
        let v = a.create_volume(&keep).unwrap();
        a.delete_volume(&v.id).unwrap();
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().state,
            VolumeState::Erasing
        );
        assert_eq!(a.erase_pending().unwrap(), 1);
        a.set_erase_policy(ErasePolicy {
            allow_unerased_reuse: true,
            rate: None,
        });
        let v = a.create_volume(&keep).unwrap();
        a.delete_volume(&v.id).unwrap();
        assert!(
            a.volume(&v.id).unwrap().is_none(),
            "single-tenant: no erase"
        );
        // eraseAfter=true still erases on a single-tenant node.
        let v = a.create_volume(&CreateRequest::new("e", Bytes(A))).unwrap();
        a.delete_volume(&v.id).unwrap();
        assert_eq!(a.erase_pending().unwrap(), 1);
        assert_eq!(
            *b.calls(),
            [
                "create 0",
                "retire 0",
                "erase 0",
                "destroy 0",
                "create 0",
                "destroy 0",
                "create 0",
                "retire 0",
                "erase 0",
                "destroy 0"
            ]
        );
    }

    #[test]
    fn a_failed_erase_keeps_the_extent_and_is_retried_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Slow::default());
        b.fail_erase.store(true, Ordering::Relaxed);
        let a = open(&dir, &b);
        let v = a.create_volume(&CreateRequest::new("v", Bytes(A))).unwrap();
        a.delete_volume(&v.id).unwrap();
        assert!(a.erase_pending().is_err());
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().state,
            VolumeState::Erasing
        );
        assert_eq!(avail(&a), Bytes(3 * A));
        drop(a);
        // After a restart the worker finds the erasing row on its own.
        b.fail_erase.store(false, Ordering::Relaxed);
        let a = open(&dir, &b);
        a.check_invariants().unwrap();
        assert_eq!(avail(&a), Bytes(3 * A));
        a.start_eraser().unwrap();
        wait_until("the resumed erase", || a.volume(&v.id).unwrap().is_none());
        assert_eq!(avail(&a), Bytes(4 * A));
        a.stop_eraser();
    }

    #[test]
    fn the_rate_paces_the_erase_and_stop_interrupts_it() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Slow::default());
        let a = open(&dir, &b);
        // 16 MiB at 1 byte/s: the first half-chunk would take years.
        a.set_erase_policy(ErasePolicy {
            allow_unerased_reuse: false,
            rate: Some(Bytes(1)),
        });
        a.start_eraser().unwrap();
        let v = a.create_volume(&CreateRequest::new("v", Bytes(A))).unwrap();
        a.delete_volume(&v.id).unwrap();
        wait_until("the erase to make progress", || {
            a.erase_stats().unwrap().pending_bytes == A / 2
        });
        a.stop_eraser();
        // Interrupted, not lost: still erasing, still reserved.
        assert_eq!(
            a.volume(&v.id).unwrap().unwrap().state,
            VolumeState::Erasing
        );
        assert_eq!(avail(&a), Bytes(3 * A));
    }
}

//! State shared by every service of one daemon.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::error::{AgentError, AgentResult};
use crate::metrics::Metrics;
use crate::store::Store;

#[derive(Debug)]
pub struct Driver {
    pub cfg: Config,
    /// The volume store: the embedded allocator or a pmem-allocd client.
    pub alloc: Store,
    pub metrics: Metrics,
    /// Device backend kind (`sim`, `direct`, `lvm`).
    pub backend: String,
    /// Volumes can grow: expansion is advertised and served only then.
    pub can_expand: bool,
    /// One lock per volume, shared by the controller, the node service and
    /// the node's background work (start-up scan, ephemeral collection).
    pub locks: Arc<VolumeLocks>,
    /// What node-level reconciliation found and did, for the admin report.
    pub node_reconcile: crate::csi::node::NodeReconcileLog,
    /// Set once the ledger is open and reconciled; Probe reports it.
    ready: AtomicBool,
    /// Why the ledger is refused (only the admin API serves), until a
    /// `ledger rebuild --apply`.
    refusal: Mutex<Option<String>>,
}

impl Driver {
    /// `backend` names the device backend for metrics (`sim`, `direct`, `lvm`).
    pub fn new(cfg: Config, alloc: Store, backend: &str, can_expand: bool) -> Driver {
        Driver {
            metrics: Metrics::new(&cfg.driver_name, backend),
            backend: backend.to_owned(),
            can_expand,
            cfg,
            alloc,
            locks: Arc::new(VolumeLocks::default()),
            node_reconcile: Default::default(),
            ready: AtomicBool::new(false),
            refusal: Mutex::new(None),
        }
    }

    pub fn set_refusal(&self, why: Option<String>) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the ledger is refused, if it is (the daemon is in recovery).
    pub fn refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Claims the volume `key` (a volume id, or the name an ephemeral inline
    /// volume is addressed by) for one operation, or ABORTED when another
    /// operation holds it. The CSI spec recommends ABORTED over waiting: the
    /// CO retries with backoff, and a stuck call never piles up waiters.
    pub fn lock_volume(&self, key: &str) -> AgentResult<VolumeGuard> {
        let mut g = VolumeGuard {
            locks: Arc::clone(&self.locks),
            keys: Vec::new(),
        };
        g.also(key)?;
        Ok(g)
    }
}

/// The set of volume keys with an operation in flight.
#[derive(Debug, Default)]
pub struct VolumeLocks {
    held: Mutex<HashSet<String>>,
}

impl VolumeLocks {
    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an operation holds `key` now.
    pub fn is_locked(&self, key: &str) -> bool {
        self.held().contains(key)
    }
}

/// Holds one or more volume keys until dropped.
#[derive(Debug)]
pub struct VolumeGuard {
    locks: Arc<VolumeLocks>,
    keys: Vec<String>,
}

impl VolumeGuard {
    /// Adds `key` to what this guard holds (a no-op when it already does);
    /// ABORTED when another operation holds it. An ephemeral volume is
    /// known by its id and by its name, so whoever may race on it holds both.
    pub fn also(&mut self, key: &str) -> AgentResult<()> {
        if self.keys.iter().any(|k| k == key) {
            return Ok(());
        }
        if !self.locks.held().insert(key.to_owned()) {
            return Err(AgentError::Aborted(format!(
                "an operation on volume {} is already in progress; retry",
                crate::error::quote(key)
            )));
        }
        self.keys.push(key.to_owned());
        Ok(())
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks() -> (Arc<VolumeLocks>, impl Fn(&str) -> AgentResult<VolumeGuard>) {
        let l = Arc::new(VolumeLocks::default());
        let l2 = Arc::clone(&l);
        (l, move |k: &str| {
            let mut g = VolumeGuard {
                locks: Arc::clone(&l2),
                keys: Vec::new(),
            };
            g.also(k)?;
            Ok(g)
        })
    }

    #[test]
    fn a_held_volume_is_aborted_until_released() {
        let (l, lock) = locks();
        let g = lock("v1").unwrap();
        assert!(l.is_locked("v1"));
        let e = lock("v1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e}");
        // Other volumes proceed.
        let g2 = lock("v2").unwrap();
        drop(g);
        assert!(!l.is_locked("v1"));
        lock("v1").unwrap();
        drop(g2);
        assert!(!l.is_locked("v2"));
    }

    #[test]
    fn a_guard_holds_every_key_it_added() {
        let (l, lock) = locks();
        let mut g = lock("id").unwrap();
        g.also("id").unwrap();
        g.also("name").unwrap();
        assert!(lock("name").is_err());
        let other = lock("x").unwrap();
        // A failed `also` leaves what the guard held untouched.
        assert!(g.also("x").is_err());
        assert!(l.is_locked("id") && l.is_locked("name"));
        drop(other);
        drop(g);
        assert!(!l.is_locked("id") && !l.is_locked("name") && !l.is_locked("x"));
    }
}

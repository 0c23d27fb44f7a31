//! State shared by every service of one daemon.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Config;
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
}

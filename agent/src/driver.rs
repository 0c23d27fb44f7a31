//! State shared by every service of one daemon.

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
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

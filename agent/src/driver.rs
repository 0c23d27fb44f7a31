//! State shared by every service of one daemon.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pmem_allocator::Allocator;

use crate::config::Config;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Driver {
    pub cfg: Config,
    pub alloc: Arc<Allocator>,
    pub metrics: Metrics,
    /// Set once the ledger is open and reconciled; Probe reports it.
    ready: AtomicBool,
}

impl Driver {
    pub fn new(cfg: Config, alloc: Arc<Allocator>) -> Driver {
        Driver {
            metrics: Metrics::new(&cfg.driver_name, alloc.backend().kind()),
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

//! Prometheus metrics. CSI call latencies are recorded as calls happen;
//! capacity and volume gauges are refreshed from the allocator at scrape
//! time, so they are never stale.

use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use pmem_allocator::{Persistency, ReconcileReport, Usage, VolumeState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::Code;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    driver_name: String,
    method_name: String,
    grpc_status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionLabels {
    region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    state: String,
    persistency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    subsystem: String,
    action: String,
}

/// Counts device events that can change capacity (a handle that the event
/// consumer keeps; it shares the registry's counters).
#[derive(Clone, Debug, Default)]
pub struct DeviceEventCounter(Family<EventLabels, Counter>);

impl DeviceEventCounter {
    pub fn inc(&self, subsystem: &str, action: &str) {
        self.0
            .get_or_create(&EventLabels {
                subsystem: subsystem.to_owned(),
                action: action.to_owned(),
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    backend: String,
}

fn histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    driver_name: String,
    registry: Mutex<Registry>,
    ops: Family<OpLabels, Histogram>,
    region_total: Family<RegionLabels, Gauge>,
    region_available: Family<RegionLabels, Gauge>,
    region_largest: Family<RegionLabels, Gauge>,
    region_free_slots: Family<RegionLabels, Gauge>,
    volumes: Family<VolumeLabels, Gauge>,
    devices: Family<DeviceLabels, Gauge>,
    ledger_commit: Histogram,
    build: Family<BuildLabels, Gauge>,
    in_flight: Gauge<i64, AtomicI64>,
    device_events: DeviceEventCounter,
    ephemeral_collected: Counter,
    ephemeral_pending: Gauge,
    mounts_recovered: Counter,
    mounts_unrecorded: Gauge,
    region_lost: Family<RegionLabels, Gauge>,
    volumes_lost: Gauge,
    ledger_refused: Gauge,
    erase_pending: Gauge,
    erased: Counter,
    /// The allocator's erased total at the last refresh (the counter moves
    /// by the difference; a restarted pmem-allocd starts again from 0).
    erased_seen: Mutex<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new("pmem-agent.csi", "")
    }
}

impl Metrics {
    pub fn new(driver_name: &str, backend: &str) -> Metrics {
        let m = Metrics {
            driver_name: driver_name.to_owned(),
            registry: Mutex::new(Registry::default()),
            ops: Family::new_with_constructor(histogram),
            region_total: Family::default(),
            region_available: Family::default(),
            region_largest: Family::default(),
            region_free_slots: Family::default(),
            volumes: Family::default(),
            devices: Family::default(),
            ledger_commit: histogram(),
            build: Family::default(),
            in_flight: Gauge::default(),
            device_events: DeviceEventCounter::default(),
            ephemeral_collected: Counter::default(),
            ephemeral_pending: Gauge::default(),
            mounts_recovered: Counter::default(),
            mounts_unrecorded: Gauge::default(),
            region_lost: Family::default(),
            volumes_lost: Gauge::default(),
            ledger_refused: Gauge::default(),
            erase_pending: Gauge::default(),
            erased: Counter::default(),
            erased_seen: Mutex::new(0),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            // Named like the CSI sidecars' metric so dashboards can share queries.
            r.register(
                "csi_plugin_operations_seconds",
                "Duration of CSI calls served by the plugin, by method and gRPC code",
                m.ops.clone(),
            );
            let p = r.sub_registry_with_prefix("pmem_agent");
            p.register("region_size_bytes", "Region size", m.region_total.clone());
            p.register(
                "region_available_bytes",
                "Free bytes in a region (erasing extents are not free)",
                m.region_available.clone(),
            );
            p.register(
                "region_largest_allocatable_bytes",
                "Largest volume a create would get now",
                m.region_largest.clone(),
            );
            p.register(
                "region_free_namespace_slots",
                "Volumes the region can still hold by its namespace slots",
                m.region_free_slots.clone(),
            );
            p.register(
                "volumes",
                "Volumes in the ledger by state and persistency",
                m.volumes.clone(),
            );
            p.register(
                "devices",
                "Devices found by the last reconciliation that no volume owns (orphan) or that are not ours (foreign)",
                m.devices.clone(),
            );
            p.register(
                "ledger_commit_seconds",
                "Duration of durable ledger transaction commits",
                m.ledger_commit.clone(),
            );
            p.register("build_info", "Build information", m.build.clone());
            p.register(
                "calls_in_flight",
                "RPCs being served now",
                m.in_flight.clone(),
            );
            p.register(
                "log_write_errors",
                "Log events dropped because the log sink (stderr) refused the write",
                crate::logging::write_errors(),
            );
            p.register(
                "region_lost",
                "1 when the region's identity is missing or another ledger's: it serves nothing and its volumes are lost",
                m.region_lost.clone(),
            );
            p.register(
                "volumes_lost",
                "Ledger volumes on lost regions (pmemctl region forget / reinit)",
                m.volumes_lost.clone(),
            );
            p.register(
                "ledger_refused",
                "1 when the ledger does not belong to the regions and only the admin API serves (pmemctl ledger rebuild)",
                m.ledger_refused.clone(),
            );
            p.register(
                "erase_pending_bytes",
                "Bytes of deleted volumes' extents the background eraser has still to zero (neither free nor in capacity)",
                m.erase_pending.clone(),
            );
            p.register(
                "erased_bytes",
                "Bytes of deleted volumes' extents zeroed and freed",
                m.erased.clone(),
            );
            p.register(
                "device_events",
                "udev events for libnvdimm regions, namespaces and pmem block devices (direct backend)",
                m.device_events.0.clone(),
            );
            p.register(
                "ephemeral_volumes_collected",
                "CSI ephemeral inline volumes deleted by the collection because no target used them",
                m.ephemeral_collected.clone(),
            );
            p.register(
                "ephemeral_volumes_pending_collection",
                "Unused CSI ephemeral inline volumes the last collection could not delete yet (device in use); retried",
                m.ephemeral_pending.clone(),
            );
            p.register(
                "mounts_recovered",
                "Mounts of our devices without a publication record that the start-up scan recorded",
                m.mounts_recovered.clone(),
            );
            p.register(
                "mounts_unrecorded",
                "Mounts of our devices under the kubelet root that no publication records and the last scan could not record",
                m.mounts_unrecorded.clone(),
            );
        }
        m.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                backend: backend.to_owned(),
            })
            .set(1);
        m
    }

    /// Marks a call as started; the guard marks it finished when dropped.
    pub fn start_call(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The counter the device event consumer increments.
    pub fn device_events(&self) -> DeviceEventCounter {
        self.device_events.clone()
    }

    /// RPCs being served now (shutdown waits for 0).
    pub fn calls_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    pub fn observe_call(&self, method: &'static str, code: Code, took: Duration) {
        self.ops
            .get_or_create(&OpLabels {
                driver_name: self.driver_name.clone(),
                method_name: method.to_owned(),
                grpc_status_code: format!("{code:?}"),
            })
            .observe(took.as_secs_f64());
    }

    pub fn observe_commit(&self, took: Duration) {
        self.ledger_commit.observe(took.as_secs_f64());
    }

    pub fn ephemeral_collected(&self) {
        self.ephemeral_collected.inc();
    }

    pub fn set_ephemeral_pending(&self, n: usize) {
        self.ephemeral_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn mount_recovered(&self) {
        self.mounts_recovered.inc();
    }

    pub fn set_unrecorded_mounts(&self, n: usize) {
        self.mounts_unrecorded
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records the device findings of a reconciliation.
    pub fn record_reconcile(&self, rep: &ReconcileReport) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.devices
            .get_or_create(&DeviceLabels {
                kind: "orphan".into(),
            })
            .set(n(rep.orphans.len()));
        self.devices
            .get_or_create(&DeviceLabels {
                kind: "foreign".into(),
            })
            .set(n(rep.foreign.len()));
    }

    /// Refreshes the gauges (blocking: call off the async threads). Nothing
    /// here reads or counts every volume: capacity and per-region volume
    /// counts come from the allocator's memory, volumes by state from the
    /// ledger's kept counts, the erase figures from the erasing rows only.
    pub fn refresh(&self, alloc: &dyn crate::store::VolumeStore) -> pmem_allocator::Result<()> {
        let to = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
        let caps = alloc.capacity_summary(Usage::AppDirect)?;
        for c in &caps {
            let l = RegionLabels {
                region: c.spec.id.clone(),
            };
            self.region_total.get_or_create(&l).set(to(c.spec.size.0));
            self.region_available
                .get_or_create(&l)
                .set(to(c.available.0));
            self.region_largest.get_or_create(&l).set(to(c.largest.0));
            self.region_free_slots
                .get_or_create(&l)
                .set(i64::from(c.free_slots));
        }
        let status = alloc.ledger_status()?;
        self.ledger_refused.set(i64::from(status.refused.is_some()));
        let erase = alloc.erase_stats()?;
        self.erase_pending.set(to(erase.pending_bytes));
        {
            let mut seen = self.erased_seen.lock().unwrap_or_else(|e| e.into_inner());
            let delta = erase
                .erased_bytes_total
                .checked_sub(*seen)
                .unwrap_or(erase.erased_bytes_total);
            self.erased.inc_by(delta);
            *seen = erase.erased_bytes_total;
        }
        let mut lost = 0u64;
        for c in &caps {
            let is_lost = status.lost.contains_key(&c.spec.id);
            self.region_lost
                .get_or_create(&RegionLabels {
                    region: c.spec.id.clone(),
                })
                .set(i64::from(is_lost));
            if is_lost {
                lost += u64::from(c.volumes);
            }
        }
        self.volumes_lost.set(to(lost));
        let counts = alloc.volume_counts()?;
        self.volumes.clear();
        for state in VolumeState::ALL {
            for persistency in [Persistency::Persistent, Persistency::Ephemeral] {
                let count = counts
                    .iter()
                    .filter(|(s, p, _)| *s == state && *p == persistency)
                    .map(|(_, _, n)| *n)
                    .sum::<u64>();
                self.volumes
                    .get_or_create(&VolumeLabels {
                        state: state.to_string(),
                        persistency: persistency.as_str().to_owned(),
                    })
                    .set(to(count));
            }
        }
        Ok(())
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            tracing::error!(error = %e, "encode metrics");
        }
        out
    }
}

/// Counts one in-flight call while alive.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge<i64, AtomicI64>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

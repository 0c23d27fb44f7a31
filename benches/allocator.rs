//! Allocator benches. Each group measures a baseline in the same run so
//! results can be reported as ratios:
//! - `placement`: the placement decision with 10,000 existing volumes
//!   (fragmented free space) versus an empty node;
//! - `ledger`: a create+delete cycle with full durability (the create and
//!   delete intents made durable by the ledger's barrier, the background
//!   eraser running as in the daemon) versus one bare durable sqlite commit
//!   (WAL, synchronous=FULL).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use pmem_allocator::sim::{SimBackend, SimConfig, SimMode};
use pmem_allocator::{Allocator, Bytes, CreateRequest};

const ALIGN: u64 = 4 << 20;

fn allocator(dir: &std::path::Path, region_units: u64, slots: u32) -> Allocator {
    let mut cfg = SimConfig::default_in(dir.join("sim"));
    cfg.regions = 2;
    cfg.region_size = Bytes(region_units * ALIGN);
    cfg.align = Bytes(ALIGN);
    cfg.ns_slots = slots;
    cfg.mode = Some(SimMode::FileOnly);
    let b = Arc::new(SimBackend::open(&cfg).expect("sim backend"));
    Allocator::open(&dir.join("ledger.db"), b).expect("allocator")
}

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = allocator(empty_dir.path(), 20_000, 20_000);
    // 10,000 volumes of 1-3 units, every fourth deleted: many holes.
    let full_dir = tempfile::tempdir().unwrap();
    let full = allocator(full_dir.path(), 20_000, 20_000);
    let mut ids = Vec::new();
    for i in 0..13_334u64 {
        let v = full
            .create_volume(&CreateRequest::new(
                format!("v{i}"),
                Bytes((1 + i % 3) * ALIGN),
            ))
            .unwrap();
        ids.push(v.id);
    }
    for id in ids.iter().step_by(4) {
        full.delete_volume(id).unwrap();
    }
    // Deleted extents are free once erased (the daemon's eraser does this).
    full.erase_pending().unwrap();
    assert_eq!(full.volumes().unwrap().len(), 10_000);
    let req = CreateRequest::new("probe", Bytes(2 * ALIGN));
    g.bench_function("baseline_empty_node", |b| {
        b.iter(|| black_box(empty.plan(black_box(&req)).unwrap()))
    });
    g.bench_function("with_10000_volumes", |b| {
        b.iter(|| black_box(full.plan(black_box(&req)).unwrap()))
    });
    g.finish();
}

fn ledger(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger");
    g.sample_size(20);
    let dir = tempfile::tempdir().unwrap();
    let raw = rusqlite_baseline(dir.path());
    let mut n = 0u64;
    g.bench_function("baseline_bare_durable_commit", |b| {
        b.iter(|| {
            n += 1;
            raw.execute("INSERT INTO t (v) VALUES (?1)", [n as i64])
                .unwrap();
        })
    });
    let a = Arc::new(allocator(dir.path(), 1024, 509));
    // As in the daemon: deleted extents are zeroed and freed in batches.
    a.start_eraser().unwrap();
    let mut i = 0u64;
    g.bench_function("create_delete_durable", |b| {
        b.iter(|| {
            i += 1;
            let v = a
                .create_volume(&CreateRequest::new(format!("c{i}"), Bytes(ALIGN)))
                .unwrap();
            a.delete_volume(&v.id).unwrap();
        })
    });
    g.finish();
    a.stop_eraser();
}

/// One autocommit insert with the ledger's durability settings.
fn rusqlite_baseline(dir: &std::path::Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("baseline.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER) STRICT;",
    )
    .unwrap();
    c
}

criterion_group!(benches, placement, ledger);
criterion_main!(benches);

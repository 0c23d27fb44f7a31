//! Region invariants through the real ledger: random sequences of create,
//! delete, expand and reopen (a restart), checked after every step against
//! a simple model. Uses the sim backend in file-only mode (no root needed).

use std::collections::BTreeMap;
use std::sync::Arc;

use pmem_allocator::sim::{SimBackend, SimConfig, SimMode};
use pmem_allocator::{Allocator, Bytes, CreateRequest, Error, Usage};
use proptest::prelude::*;

const ALIGN: u64 = 16 << 20;
const REGION: u64 = 64 * ALIGN;

#[derive(Debug, Clone)]
enum Op {
    Create(u64),
    Delete(usize),
    Expand(usize, u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..20).prop_map(Op::Create),
        3 => any::<usize>().prop_map(Op::Delete),
        2 => (any::<usize>(), 1u64..8).prop_map(|(i, d)| Op::Expand(i, d)),
        1 => Just(Op::Reopen),
    ]
}

fn open(dir: &std::path::Path) -> Allocator {
    let mut cfg = SimConfig::default_in(dir.join("sim"));
    cfg.regions = 2;
    cfg.region_size = Bytes(REGION);
    cfg.ns_slots = 12;
    cfg.mode = Some(SimMode::FileOnly);
    let b = Arc::new(SimBackend::open(&cfg).unwrap());
    let a = Allocator::open(&dir.join("ledger.db"), b).unwrap();
    let rep = a.reconcile(false, false).unwrap();
    assert!(rep.errors.is_empty());
    a
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After every step: extent maps satisfy their invariants and match the
    /// ledger; every live volume is where the model says; free + used = size
    /// per region; capacity reports agree with what create then does.
    #[test]
    fn invariants_hold_through_ledger_and_restart(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = open(dir.path());
        // name -> size in alignment units
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        let mut n = 0;
        for op in ops {
            match op {
                Op::Create(units) => {
                    n += 1;
                    let name = format!("v{n}");
                    let caps = a.capacity(Usage::AppDirect).unwrap();
                    let largest = caps.iter().map(|c| c.largest.0).max().unwrap();
                    match a.create_volume(&CreateRequest::new(&name, Bytes(units * ALIGN))) {
                        Ok(v) => {
                            prop_assert!(units * ALIGN <= largest, "created above the reported maximum");
                            prop_assert_eq!(v.size.0, units * ALIGN);
                            model.insert(name, units);
                        }
                        Err(Error::Exhausted { largest: l, .. }) => {
                            prop_assert!(units * ALIGN > largest, "refused below the reported maximum");
                            prop_assert_eq!(l.0, largest);
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Delete(i) if !model.is_empty() => {
                    let name = model.keys().nth(i % model.len()).unwrap().clone();
                    let v = a.volume_by_name(&name).unwrap().unwrap();
                    a.delete_volume(&v.id).unwrap();
                    // The extent is erasing: reserved until the eraser ran.
                    prop_assert_eq!(a.erase_stats().unwrap().volumes, 1);
                    a.erase_pending().unwrap();
                    model.remove(&name);
                    // Deleting again (unknown id) succeeds.
                    a.delete_volume(&v.id).unwrap();
                }
                Op::Expand(i, d) if !model.is_empty() => {
                    let name = model.keys().nth(i % model.len()).unwrap().clone();
                    let v = a.volume_by_name(&name).unwrap().unwrap();
                    let want = v.size.0 + d * ALIGN;
                    match a.expand_volume(&v.id, Bytes(want), None) {
                        Ok(e) => {
                            prop_assert_eq!(e.size.0, want);
                            *model.get_mut(&name).unwrap() += d;
                        }
                        Err(Error::OutOfRange(_)) => {}
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Reopen => {
                    drop(a);
                    a = open(dir.path());
                }
                _ => {}
            }
            a.check_invariants().map_err(TestCaseError::fail)?;
            let vols = a.volumes().unwrap();
            prop_assert_eq!(vols.len(), model.len());
            for v in &vols {
                prop_assert_eq!(Some(&(v.size.0 / ALIGN)), model.get(&v.name));
            }
            for c in a.capacity(Usage::AppDirect).unwrap() {
                let used: u64 = vols.iter().filter(|v| v.region == c.spec.id).map(|v| v.size.0).sum();
                if c.free_slots > 0 {
                    prop_assert_eq!(c.available.0 + used, REGION);
                }
            }
        }
    }
}

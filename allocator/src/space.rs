//! A region's free space as the allocator accounts for it: either an
//! [`ExtentMap`] (contiguous extents at real offsets: sim, direct) or a
//! [`Pool`] (bytes only: an LVM volume group, where a logical volume need
//! not be contiguous). Allocator code talks to [`Space`] and never cares
//! which it is.

use std::collections::BTreeMap;

use crate::backend::Placement;
use crate::region::{Extent, ExtentError, ExtentMap, RegionSpec};
use crate::units::Bytes;

/// Used and free bytes of a pooled region, keyed by volume id (or a
/// reservation key). Offsets mean nothing here: pooled volumes are
/// recorded at offset 0.
///
/// Invariants (checked by [`Pool::check`], exercised by proptest):
/// - every used length is a non-zero multiple of `align`;
/// - `used_bytes` is the sum of used lengths and never exceeds `size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    size: u64,
    align: u64,
    used: BTreeMap<String, u64>,
    used_bytes: u64,
}

impl Pool {
    /// An empty pool. `size` is rounded down to the alignment.
    pub fn new(size: Bytes, align: Bytes) -> Pool {
        assert!(align.0 > 0, "pool alignment must be non-zero");
        Pool {
            size: size.align_down(align).0,
            align: align.0,
            used: BTreeMap::new(),
            used_bytes: 0,
        }
    }

    fn validate(&self, len: u64) -> Result<(), ExtentError> {
        if len == 0 {
            return Err(ExtentError::Empty);
        }
        if !len.is_multiple_of(self.align) {
            return Err(ExtentError::Misaligned {
                offset: 0,
                len,
                align: self.align,
            });
        }
        Ok(())
    }

    fn free(&self) -> u64 {
        self.size - self.used_bytes
    }

    /// Takes `len` bytes for `key`; the key must be new and the bytes free.
    pub fn reserve(&mut self, key: &str, len: Bytes) -> Result<(), ExtentError> {
        self.validate(len.0)?;
        if self.used.contains_key(key) || len.0 > self.free() {
            return Err(ExtentError::Overlap {
                offset: 0,
                len: len.0,
            });
        }
        self.used.insert(key.to_owned(), len.0);
        self.used_bytes += len.0;
        Ok(())
    }

    /// Gives back what `key` holds; it must hold exactly `len`.
    pub fn release(&mut self, key: &str, len: Bytes) -> Result<(), ExtentError> {
        if self.used.get(key) != Some(&len.0) {
            return Err(ExtentError::NotUsed {
                offset: 0,
                len: len.0,
            });
        }
        self.used.remove(key);
        self.used_bytes -= len.0;
        Ok(())
    }

    /// Grows what `key` holds from `old` to `new` bytes.
    pub fn grow(&mut self, key: &str, old: Bytes, new: Bytes) -> Result<(), ExtentError> {
        if self.used.get(key) != Some(&old.0) {
            return Err(ExtentError::NotUsed {
                offset: 0,
                len: old.0,
            });
        }
        if new <= old {
            return Ok(());
        }
        self.validate(new.0)?;
        let delta = new.0 - old.0;
        if delta > self.free() {
            return Err(ExtentError::Overlap {
                offset: 0,
                len: delta,
            });
        }
        self.used.insert(key.to_owned(), new.0);
        self.used_bytes += delta;
        Ok(())
    }

    pub fn free_total(&self) -> Bytes {
        Bytes(self.free())
    }

    pub fn used_count(&self) -> usize {
        self.used.len()
    }

    /// Whether `key` holds bytes here.
    pub fn holds(&self, key: &str) -> bool {
        self.used.contains_key(key)
    }

    /// Used entries in key order, laid out one after another (the offsets
    /// are for display only), then the free rest.
    pub fn extents(&self) -> Vec<(Extent, Option<String>)> {
        let mut at = 0;
        let mut out: Vec<(Extent, Option<String>)> = self
            .used
            .iter()
            .map(|(k, &l)| {
                let e = Extent {
                    offset: Bytes(at),
                    len: Bytes(l),
                };
                at += l;
                (e, Some(k.clone()))
            })
            .collect();
        if self.free() > 0 {
            out.push((
                Extent {
                    offset: Bytes(at),
                    len: Bytes(self.free()),
                },
                None,
            ));
        }
        out
    }

    /// Checks every invariant listed on the type.
    pub fn check(&self) -> Result<(), String> {
        let mut total = 0u64;
        for (k, &l) in &self.used {
            if l == 0 || !l.is_multiple_of(self.align) {
                return Err(format!(
                    "{k} holds {l} bytes, not a multiple of {}",
                    self.align
                ));
            }
            total += l;
        }
        if total != self.used_bytes {
            return Err(format!("used {total} but accounted {}", self.used_bytes));
        }
        if total > self.size {
            return Err(format!("used {total} beyond size {}", self.size));
        }
        Ok(())
    }
}

/// One entry of [`Space::extents`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub extent: Extent,
    pub used: bool,
    /// Who holds it, where the space knows (pools know their keys).
    pub key: Option<String>,
}

/// A region's space: contiguous extents or a pool of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Space {
    Extents(ExtentMap),
    Pool(Pool),
}

impl Space {
    /// The empty space of a region, of the kind `placement` needs.
    pub fn new(spec: &RegionSpec, placement: Placement) -> Space {
        match placement {
            Placement::Pooled => Space::Pool(Pool::new(spec.size, spec.align)),
            Placement::BestFit | Placement::FirstFit => {
                Space::Extents(ExtentMap::new(spec.size, spec.align))
            }
        }
    }

    /// Takes `len` bytes at `offset` (extents) or for `key` (pool).
    pub fn reserve(&mut self, key: &str, offset: Bytes, len: Bytes) -> Result<(), ExtentError> {
        match self {
            Space::Extents(m) => m.reserve(offset, len),
            Space::Pool(p) => p.reserve(key, len),
        }
    }

    pub fn release(&mut self, key: &str, offset: Bytes, len: Bytes) -> Result<(), ExtentError> {
        match self {
            Space::Extents(m) => m.release(offset, len),
            Space::Pool(p) => p.release(key, len),
        }
    }

    pub fn grow(
        &mut self,
        key: &str,
        offset: Bytes,
        old: Bytes,
        new: Bytes,
    ) -> Result<(), ExtentError> {
        match self {
            Space::Extents(m) => m.grow(offset, old, new),
            Space::Pool(p) => p.grow(key, old, new),
        }
    }

    /// How many bytes the volume at `offset` can grow by: the free extent
    /// right after it, or anything free in a pool.
    pub fn room_to_grow(&self, offset: Bytes) -> Bytes {
        match self {
            Space::Extents(m) => m.free_after(offset),
            Space::Pool(p) => p.free_total(),
        }
    }

    /// Where a new volume of `len` bytes goes, and the size of the hole it
    /// takes (the region with the smallest such hole wins placement).
    pub fn fit(&self, len: Bytes, placement: Placement) -> Option<(Bytes, Bytes)> {
        match (self, placement) {
            (Space::Pool(p), _) => (p.free_total() >= len).then(|| (Bytes::ZERO, p.free_total())),
            (Space::Extents(m), Placement::FirstFit) => m
                .extents()
                .into_iter()
                .find(|(e, used)| !used && e.len >= len)
                .map(|(e, _)| (e.offset, e.len)),
            (Space::Extents(m), _) => m.best_fit(len).zip(m.best_fit_len(len)),
        }
    }

    pub fn free_total(&self) -> Bytes {
        match self {
            Space::Extents(m) => m.free_total(),
            Space::Pool(p) => p.free_total(),
        }
    }

    /// The largest single volume's bytes that fit now.
    pub fn largest_free(&self) -> Bytes {
        match self {
            Space::Extents(m) => m.largest_free(),
            Space::Pool(p) => p.free_total(),
        }
    }

    pub fn used_count(&self) -> usize {
        match self {
            Space::Extents(m) => m.used_count(),
            Space::Pool(p) => p.used_count(),
        }
    }

    pub fn extents(&self) -> Vec<Slot> {
        match self {
            Space::Extents(m) => m
                .extents()
                .into_iter()
                .map(|(extent, used)| Slot {
                    extent,
                    used,
                    key: None,
                })
                .collect(),
            Space::Pool(p) => p
                .extents()
                .into_iter()
                .map(|(extent, key)| Slot {
                    extent,
                    used: key.is_some(),
                    key,
                })
                .collect(),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            Space::Extents(m) => m.check(),
            Space::Pool(p) => p.check(),
        }
    }

    /// Reserves what the device layer has allocated outside the ledger:
    /// for extents, the free parts of `[offset, offset+len)` widened to the
    /// alignment; for a pool, `len` under `key`. Returns what it took.
    pub fn reserve_uncovered(&mut self, key: &str, offset: Bytes, len: Bytes) -> Vec<Extent> {
        match self {
            Space::Extents(m) => reserve_uncovered(m, offset, len),
            Space::Pool(p) => {
                let a = Bytes(p.align);
                let len = len.align_up(a).unwrap_or(len).min(p.free_total());
                if len.0 > 0 && p.reserve(key, len).is_ok() {
                    vec![Extent {
                        offset: Bytes::ZERO,
                        len,
                    }]
                } else {
                    Vec::new()
                }
            }
        }
    }
}

fn reserve_uncovered(map: &mut ExtentMap, offset: Bytes, len: Bytes) -> Vec<Extent> {
    let a = map.align();
    let start = offset.align_down(a);
    let end = offset
        .checked_add(len)
        .and_then(|e| e.align_up(a))
        .map_or(map.size(), |e| e.min(map.size()));
    let mut got = Vec::new();
    for (e, used) in map.extents() {
        let (s, t) = (e.offset.max(start), e.end().min(end));
        if used || s >= t {
            continue;
        }
        if map.reserve(s, t - s).is_ok() {
            got.push(Extent {
                offset: s,
                len: t - s,
            });
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: u64 = 4 << 20;

    fn spec(units: u64) -> RegionSpec {
        RegionSpec {
            id: "vg".into(),
            size: Bytes(units * A),
            align: Bytes(A),
            ns_slots: u32::MAX,
            numa_node: 0,
            location: String::new(),
        }
    }

    #[test]
    fn a_pool_needs_no_contiguous_hole() {
        let mut s = Space::new(&spec(4), Placement::Pooled);
        for k in ["a", "b", "c", "d"] {
            let (o, _) = s.fit(Bytes(A), Placement::Pooled).unwrap();
            s.reserve(k, o, Bytes(A)).unwrap();
        }
        assert_eq!(s.fit(Bytes(A), Placement::Pooled), None);
        s.release("a", Bytes::ZERO, Bytes(A)).unwrap();
        s.release("c", Bytes::ZERO, Bytes(A)).unwrap();
        // A and C were not adjacent; their sum still fits in one volume.
        assert_eq!(s.largest_free(), Bytes(2 * A));
        s.reserve("e", Bytes::ZERO, Bytes(2 * A)).unwrap();
        s.check().unwrap();
        assert!(
            s.reserve("e", Bytes::ZERO, Bytes(A)).is_err(),
            "keys are unique"
        );
    }

    #[test]
    fn extents_need_one() {
        let mut s = Space::new(&spec(4), Placement::BestFit);
        for i in 0..4 {
            s.reserve("", Bytes(i * A), Bytes(A)).unwrap();
        }
        s.release("", Bytes::ZERO, Bytes(A)).unwrap();
        s.release("", Bytes(2 * A), Bytes(A)).unwrap();
        assert_eq!(s.largest_free(), Bytes(A));
        assert_eq!(s.fit(Bytes(2 * A), Placement::BestFit), None);
    }

    #[test]
    fn pool_grow_and_reserved() {
        let mut s = Space::new(&spec(8), Placement::Pooled);
        s.reserve("a", Bytes::ZERO, Bytes(A)).unwrap();
        assert_eq!(s.room_to_grow(Bytes::ZERO), Bytes(7 * A));
        s.grow("a", Bytes::ZERO, Bytes(A), Bytes(3 * A)).unwrap();
        let got = s.reserve_uncovered("foreign:x", Bytes::ZERO, Bytes(A + 1));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len, Bytes(2 * A));
        assert_eq!(s.free_total(), Bytes(3 * A));
        assert!(
            s.grow("a", Bytes::ZERO, Bytes(3 * A), Bytes(7 * A))
                .is_err()
        );
        let slots = s.extents();
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[2].key, None);
        assert!(!slots[2].used);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take(u64),
        Give(usize),
        Grow(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..8).prop_map(Op::Take),
            (0usize..16).prop_map(Op::Give),
            ((0usize..16), (1u64..4)).prop_map(|(i, d)| Op::Grow(i, d)),
        ]
    }

    proptest! {
        /// Any sequence keeps the pool's invariants, and a request fits
        /// exactly when the free bytes (not a hole) suffice.
        #[test]
        fn pool_invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = Space::new(&spec(32), Placement::Pooled);
            let mut live: Vec<(String, u64)> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Take(u) => {
                        let fits = s.free_total().0 >= u * A;
                        prop_assert_eq!(s.fit(Bytes(u * A), Placement::Pooled).is_some(), fits);
                        if fits {
                            let k = format!("v{n}");
                            s.reserve(&k, Bytes::ZERO, Bytes(u * A)).unwrap();
                            live.push((k, u * A));
                        }
                    }
                    Op::Give(i) if !live.is_empty() => {
                        let (k, l) = live.remove(i % live.len());
                        s.release(&k, Bytes::ZERO, Bytes(l)).unwrap();
                    }
                    Op::Grow(i, d) if !live.is_empty() => {
                        let i = i % live.len();
                        let fits = s.room_to_grow(Bytes::ZERO).0 >= d * A;
                        let (k, l) = live[i].clone();
                        let r = s.grow(&k, Bytes::ZERO, Bytes(l), Bytes(l + d * A));
                        prop_assert_eq!(r.is_ok(), fits);
                        if fits { live[i].1 += d * A; }
                    }
                    _ => {}
                }
                s.check().map_err(TestCaseError::fail)?;
                let used: u64 = live.iter().map(|(_, l)| l).sum();
                prop_assert_eq!(s.free_total().0 + used, 32 * A);
            }
        }
    }
}

//! The region model shared by every backend: a region's static description
//! and its extent map.

use std::collections::{BTreeMap, BTreeSet};

use crate::units::Bytes;

/// Static description of a region as the backend found or configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    /// Stable identifier (`region0`, or the libnvdimm region name).
    pub id: String,
    /// Size in bytes that volumes can use; a multiple of `align`.
    pub size: Bytes,
    /// Every extent offset and length is a multiple of this.
    pub align: Bytes,
    /// How many volumes (namespaces, label slots) the region can hold.
    pub ns_slots: u32,
    pub numa_node: i32,
    /// Backend-specific location: region file, sysfs path, volume group.
    pub location: String,
}

/// One extent of a region, free or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: Bytes,
    pub len: Bytes,
}

impl Extent {
    pub fn end(&self) -> Bytes {
        self.offset + self.len
    }
}

/// Why an extent operation was refused. These are programming or ledger
/// consistency errors, never user errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("extent {offset}+{len} is not aligned to {align}")]
    Misaligned { offset: u64, len: u64, align: u64 },
    #[error("extent {offset}+{len} is outside the region of {size} bytes")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("extent {offset}+{len} overlaps an extent in use")]
    Overlap { offset: u64, len: u64 },
    #[error("extent {offset}+{len} is not an extent in use")]
    NotUsed { offset: u64, len: u64 },
    #[error("extent of length zero")]
    Empty,
}

/// Free and used extents of one region.
///
/// Invariants (checked by [`ExtentMap::check`], exercised by proptest):
/// - every extent, free or used, lies within `[0, size)`, has non-zero length
///   and an offset and length that are multiples of `align`;
/// - no two extents overlap; free extents are coalesced (no two free extents
///   touch);
/// - the sum of free and used lengths equals `size`;
/// - the size index holds exactly the free extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentMap {
    size: u64,
    align: u64,
    /// offset -> length
    free: BTreeMap<u64, u64>,
    /// (length, offset) of every free extent: best fit and largest in O(log n).
    by_size: BTreeSet<(u64, u64)>,
    /// Sum of free lengths.
    free_bytes: u64,
    /// offset -> length
    used: BTreeMap<u64, u64>,
}

impl ExtentMap {
    /// An empty region. `size` is rounded down to the alignment.
    pub fn new(size: Bytes, align: Bytes) -> ExtentMap {
        assert!(align.0 > 0, "region alignment must be non-zero");
        let size = size.align_down(align).0;
        let mut m = ExtentMap {
            size,
            align: align.0,
            free: BTreeMap::new(),
            by_size: BTreeSet::new(),
            free_bytes: 0,
            used: BTreeMap::new(),
        };
        if size > 0 {
            m.add_free(0, size);
        }
        m
    }

    fn add_free(&mut self, offset: u64, len: u64) {
        self.free.insert(offset, len);
        self.by_size.insert((len, offset));
        self.free_bytes += len;
    }

    fn remove_free(&mut self, offset: u64) -> Option<u64> {
        let len = self.free.remove(&offset)?;
        self.by_size.remove(&(len, offset));
        self.free_bytes -= len;
        Some(len)
    }

    pub fn size(&self) -> Bytes {
        Bytes(self.size)
    }

    pub fn align(&self) -> Bytes {
        Bytes(self.align)
    }

    fn validate(&self, offset: u64, len: u64) -> Result<(), ExtentError> {
        if len == 0 {
            return Err(ExtentError::Empty);
        }
        if !offset.is_multiple_of(self.align) || !len.is_multiple_of(self.align) {
            return Err(ExtentError::Misaligned {
                offset,
                len,
                align: self.align,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExtentError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// The free extent containing `[offset, offset+len)`, if any.
    fn free_containing(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let (&fo, &fl) = self.free.range(..=offset).next_back()?;
        (offset + len <= fo + fl).then_some((fo, fl))
    }

    /// Marks `[offset, offset+len)` as used; it must be free.
    pub fn reserve(&mut self, offset: Bytes, len: Bytes) -> Result<(), ExtentError> {
        let (offset, len) = (offset.0, len.0);
        self.validate(offset, len)?;
        let (fo, fl) = self
            .free_containing(offset, len)
            .ok_or(ExtentError::Overlap { offset, len })?;
        self.remove_free(fo);
        if offset > fo {
            self.add_free(fo, offset - fo);
        }
        let end = offset + len;
        if end < fo + fl {
            self.add_free(end, fo + fl - end);
        }
        self.used.insert(offset, len);
        Ok(())
    }

    /// Returns a used extent to the free map, coalescing with neighbours.
    pub fn release(&mut self, offset: Bytes, len: Bytes) -> Result<(), ExtentError> {
        let (offset, len) = (offset.0, len.0);
        if self.used.get(&offset) != Some(&len) {
            return Err(ExtentError::NotUsed { offset, len });
        }
        self.used.remove(&offset);
        let mut start = offset;
        let mut end = offset + len;
        if let Some((&po, &pl)) = self.free.range(..offset).next_back()
            && po + pl == offset
        {
            self.remove_free(po);
            start = po;
        }
        if let Some(nl) = self.remove_free(end) {
            end += nl;
        }
        self.add_free(start, end - start);
        Ok(())
    }

    /// Free bytes directly after the used extent at `offset`.
    pub fn free_after(&self, offset: Bytes) -> Bytes {
        match self.used.get(&offset.0) {
            Some(&len) => Bytes(self.free.get(&(offset.0 + len)).copied().unwrap_or(0)),
            None => Bytes::ZERO,
        }
    }

    /// Grows the used extent at `offset` from `old` to `new` bytes in place.
    pub fn grow(&mut self, offset: Bytes, old: Bytes, new: Bytes) -> Result<(), ExtentError> {
        if self.used.get(&offset.0) != Some(&old.0) {
            return Err(ExtentError::NotUsed {
                offset: offset.0,
                len: old.0,
            });
        }
        if new <= old {
            return Ok(());
        }
        self.validate(offset.0, new.0)?;
        let tail = offset + old;
        let delta = new - old;
        let avail = self.free.get(&tail.0).copied().unwrap_or(0);
        if avail < delta.0 {
            return Err(ExtentError::Overlap {
                offset: tail.0,
                len: delta.0,
            });
        }
        self.remove_free(tail.0);
        if avail > delta.0 {
            self.add_free(tail.0 + delta.0, avail - delta.0);
        }
        self.used.insert(offset.0, new.0);
        Ok(())
    }

    /// Best fit: the smallest free extent that holds `len`; ties go to the
    /// lowest offset. Returns the offset.
    pub fn best_fit(&self, len: Bytes) -> Option<Bytes> {
        self.by_size
            .range((len.0, 0)..)
            .next()
            .map(|&(_, o)| Bytes(o))
    }

    /// Length of the free extent that `best_fit(len)` would use.
    pub fn best_fit_len(&self, len: Bytes) -> Option<Bytes> {
        self.best_fit(len)
            .and_then(|o| self.free.get(&o.0).map(|&l| Bytes(l)))
    }

    pub fn free_total(&self) -> Bytes {
        Bytes(self.free_bytes)
    }

    pub fn used_total(&self) -> Bytes {
        Bytes(self.used.values().sum())
    }

    pub fn largest_free(&self) -> Bytes {
        Bytes(self.by_size.last().map_or(0, |&(l, _)| l))
    }

    pub fn used_count(&self) -> usize {
        self.used.len()
    }

    /// All extents in offset order, each tagged `true` when used.
    pub fn extents(&self) -> Vec<(Extent, bool)> {
        let mut all: Vec<(Extent, bool)> = self
            .free
            .iter()
            .map(|(&o, &l)| {
                (
                    Extent {
                        offset: Bytes(o),
                        len: Bytes(l),
                    },
                    false,
                )
            })
            .chain(self.used.iter().map(|(&o, &l)| {
                (
                    Extent {
                        offset: Bytes(o),
                        len: Bytes(l),
                    },
                    true,
                )
            }))
            .collect();
        all.sort_by_key(|(e, _)| e.offset);
        all
    }

    /// Checks every invariant listed on the type.
    pub fn check(&self) -> Result<(), String> {
        let mut total = 0u64;
        let mut prev_end = 0u64;
        let mut prev_free = false;
        for (e, used) in self.extents() {
            let (o, l) = (e.offset.0, e.len.0);
            if l == 0 {
                return Err(format!("empty extent at {o}"));
            }
            if o % self.align != 0 || l % self.align != 0 {
                return Err(format!("extent {o}+{l} not aligned to {}", self.align));
            }
            if o < prev_end {
                return Err(format!("extent {o}+{l} overlaps the previous one"));
            }
            if o + l > self.size {
                return Err(format!("extent {o}+{l} beyond size {}", self.size));
            }
            if !used && prev_free && o == prev_end {
                return Err(format!("free extent {o}+{l} not coalesced"));
            }
            prev_free = !used;
            prev_end = o + l;
            total += l;
        }
        if total != self.size {
            return Err(format!("free + used = {total}, size = {}", self.size));
        }
        let indexed: BTreeSet<(u64, u64)> = self.free.iter().map(|(&o, &l)| (l, o)).collect();
        if indexed != self.by_size || self.free.values().sum::<u64>() != self.free_bytes {
            return Err("size index differs from the free extents".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: u64 = 16 << 20;

    #[test]
    fn reserve_release_coalesces() {
        let mut m = ExtentMap::new(Bytes(10 * A), Bytes(A));
        m.reserve(Bytes(0), Bytes(2 * A)).unwrap();
        m.reserve(Bytes(2 * A), Bytes(2 * A)).unwrap();
        m.reserve(Bytes(4 * A), Bytes(A)).unwrap();
        m.check().unwrap();
        m.release(Bytes(2 * A), Bytes(2 * A)).unwrap();
        m.release(Bytes(4 * A), Bytes(A)).unwrap();
        m.check().unwrap();
        assert_eq!(m.largest_free(), Bytes(8 * A));
        assert_eq!(
            m.reserve(Bytes(A), Bytes(A)),
            Err(ExtentError::Overlap { offset: A, len: A })
        );
        assert!(matches!(
            m.reserve(Bytes(3), Bytes(A)),
            Err(ExtentError::Misaligned { .. })
        ));
        assert!(matches!(
            m.reserve(Bytes(9 * A), Bytes(2 * A)),
            Err(ExtentError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn best_fit_prefers_smallest_hole() {
        let mut m = ExtentMap::new(Bytes(10 * A), Bytes(A));
        for i in 0..10 {
            m.reserve(Bytes(i * A), Bytes(A)).unwrap();
        }
        m.release(Bytes(A), Bytes(A)).unwrap(); // hole of 1 at 1
        m.release(Bytes(4 * A), Bytes(A)).unwrap();
        m.release(Bytes(5 * A), Bytes(A)).unwrap(); // hole of 2 at 4
        assert_eq!(m.best_fit(Bytes(A)), Some(Bytes(A)));
        assert_eq!(m.best_fit(Bytes(2 * A)), Some(Bytes(4 * A)));
        assert_eq!(m.best_fit(Bytes(3 * A)), None);
    }

    #[test]
    fn grow_in_place_uses_adjacent_free() {
        let mut m = ExtentMap::new(Bytes(4 * A), Bytes(A));
        m.reserve(Bytes(0), Bytes(A)).unwrap();
        assert_eq!(m.free_after(Bytes(0)), Bytes(3 * A));
        m.grow(Bytes(0), Bytes(A), Bytes(3 * A)).unwrap();
        m.check().unwrap();
        assert!(m.grow(Bytes(0), Bytes(3 * A), Bytes(5 * A)).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
        Grow(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..8).prop_map(Op::Alloc),
            (0usize..16).prop_map(Op::Free),
            ((0usize..16), (1u64..4)).prop_map(|(i, d)| Op::Grow(i, d)),
        ]
    }

    proptest! {
        /// Any sequence of best-fit allocations, frees and grows keeps every
        /// invariant, and `free_total` matches the model.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
            let mut m = ExtentMap::new(Bytes(64 * A), Bytes(A));
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        if let Some(o) = m.best_fit(Bytes(n * A)) {
                            m.reserve(o, Bytes(n * A)).unwrap();
                            live.push((o.0, n * A));
                        } else {
                            prop_assert!(m.largest_free().0 < n * A);
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (o, l) = live.remove(i % live.len());
                        m.release(Bytes(o), Bytes(l)).unwrap();
                    }
                    Op::Grow(i, d) if !live.is_empty() => {
                        let i = i % live.len();
                        let (o, l) = live[i];
                        let fits = m.free_after(Bytes(o)).0 >= d * A;
                        let r = m.grow(Bytes(o), Bytes(l), Bytes(l + d * A));
                        prop_assert_eq!(r.is_ok(), fits);
                        if fits { live[i].1 += d * A; }
                    }
                    _ => {}
                }
                m.check().map_err(TestCaseError::fail)?;
                let used: u64 = live.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(m.used_total().0, used);
                prop_assert_eq!(m.free_total().0 + used, 64 * A);
            }
        }
    }
}

//! Size arithmetic of libnvdimm claim devices: how many bytes of a namespace
//! the block device on top of it exposes. Both formulas were checked against
//! the kernel (Debian 6.1) in the QEMU rig, byte for byte, at 16 MiB to 2 GiB.

use crate::units::{Bytes, MIB};
use crate::volume::Usage;

/// Alignment of fsdax namespaces (pfn `align`): 2 MiB pages, what ndctl uses.
pub const PFN_ALIGN: u64 = 2 * MIB;
/// Logical block size of sector-mode (BTT) volumes.
pub const BTT_SECTOR: u64 = 4096;

const PAGE: u64 = 4096;
/// The fsdax info block area at the start of the namespace.
const PFN_INFO: u64 = 8192;
/// With map=dev the kernel reserves this much per 4 KiB page for its memmap.
const STRUCT_PAGE: u64 = 64;

/// BTT v1.1 (labels v1.1, what `ndctl init-labels` writes) starts 4 KiB into
/// the namespace. v1.2 labels start at 0, which yields at most one block
/// more than computed here, so the computed size is never above the device.
const BTT_INITIAL_OFFSET: u64 = 4096;
const BTT_PAGE: u64 = 4096;
const ARENA_MIN: u64 = 16 * MIB;
const ARENA_MAX: u64 = 512 << 30;
/// Free blocks per arena (one per lane).
const BTT_NFREE: u64 = 256;
/// Bytes of flog per free block (a group of four 16-byte entries).
const BTT_LOG_GROUP: u64 = 64;
const BTT_MAP_ENTRY: u64 = 4;

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Usable bytes of an fsdax namespace of `size` bytes with the memmap on the
/// device (pfn mode `pmem`), assuming the namespace starts 2 MiB-aligned and
/// `size` is a multiple of 2 MiB (both hold for our extents: the region
/// alignment is 2 MiB per DIMM, or the kernel's 16 MiB where it refused
/// that). The data offset is the info block plus 64 bytes per page, rounded
/// up to 2 MiB; as the size grows by 2 MiB it grows by 0 or 2 MiB, so the
/// usable sizes on 2 MiB extents are every multiple of 2 MiB from 2 MiB up
/// (a step of the offset repeats a size, it never skips one).
pub fn fsdax_usable(size: u64) -> u64 {
    if size <= PFN_INFO {
        return 0;
    }
    let pages = (size - PFN_INFO) / PAGE;
    let data_offset = round_up(PFN_INFO + STRUCT_PAGE * pages, PFN_ALIGN);
    size.saturating_sub(data_offset)
}

/// Logical blocks of one BTT arena of `arena` bytes.
fn arena_blocks(arena: u64) -> u64 {
    // Two info blocks (primary and backup), the flog, then the map and the
    // data blocks split what is left.
    let log = round_up(BTT_NFREE * BTT_LOG_GROUP, BTT_PAGE);
    let avail = (arena - arena % BTT_PAGE).saturating_sub(2 * BTT_PAGE + log);
    let internal = avail.saturating_sub(BTT_PAGE) / (BTT_SECTOR + BTT_MAP_ENTRY);
    internal.saturating_sub(BTT_NFREE)
}

/// Usable bytes of a sector-mode (BTT, 4 KiB sectors) namespace of `size`
/// bytes; 0 below the kernel's minimum (16 MiB + the initial offset).
pub fn sector_usable(size: u64) -> u64 {
    let mut left = size.saturating_sub(BTT_INITIAL_OFFSET);
    let mut blocks = 0;
    while left > 0 {
        let arena = left.min(ARENA_MAX);
        left -= arena;
        if arena < ARENA_MIN {
            break;
        }
        blocks += arena_blocks(arena);
    }
    blocks * BTT_SECTOR
}

/// Usable bytes of a namespace of `size` bytes for a volume of `usage`.
pub fn usable(size: u64, usage: Usage) -> u64 {
    match usage {
        Usage::AppDirect => fsdax_usable(size),
        Usage::FileIo => sector_usable(size),
    }
}

/// The smallest multiple of `align` (at least `align`) whose usable size is
/// at least `want`; `u64::MAX` when none fits in 64 bits. Exact inverse of
/// [`usable`] on multiples of `align`, so a capacity report of
/// `usable(extent)` always gets `extent` back on create.
pub fn extent_for(want: u64, usage: Usage, align: u64) -> u64 {
    let Some(mut e) = Bytes(want.max(1)).align_up(Bytes(align)).map(|b| b.0) else {
        return u64::MAX;
    };
    // Jump by whole alignment units of the shortfall, then step back to the
    // smallest size that still fits (usable() is monotonic).
    loop {
        let have = usable(e, usage);
        if have >= want {
            break;
        }
        let step = ((want - have) / align).max(1) * align;
        match e.checked_add(step) {
            Some(n) => e = n,
            None => return u64::MAX,
        }
    }
    while e > align && usable(e - align, usage) >= want {
        e -= align;
    }
    e
}

/// Least common multiple, for combining alignments.
pub fn lcm(a: u64, b: u64) -> u64 {
    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    if a == 0 || b == 0 {
        return a.max(b);
    }
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: u64 = 16 * MIB;

    #[test]
    fn fsdax_matches_the_kernel() {
        // Observed in the rig: pfn `size` after binding.
        assert_eq!(fsdax_usable(16 * MIB), 14_680_064);
        assert_eq!(fsdax_usable(32 * MIB), 31_457_280);
        assert_eq!(fsdax_usable(64 * MIB), 65_011_712);
        assert_eq!(fsdax_usable(1 << 30), 1_054_867_456);
        assert_eq!(fsdax_usable(2 << 30), 2_111_832_064);
    }

    #[test]
    fn sector_matches_the_kernel() {
        // Observed in the rig: btt block device sectors × 512.
        assert_eq!(sector_usable(16 * MIB), 0);
        assert_eq!(sector_usable(32 * MIB), 32_440_320);
        assert_eq!(sector_usable(48 * MIB), 49_201_152);
        assert_eq!(sector_usable(64 * MIB), 65_961_984);
        assert_eq!(sector_usable(1 << 30), 1_071_611_904);
    }

    #[test]
    fn extent_for_small_and_exact() {
        assert_eq!(extent_for(0, Usage::AppDirect, A), A);
        assert_eq!(extent_for(14_680_064, Usage::AppDirect, A), A);
        assert_eq!(extent_for(14_680_065, Usage::AppDirect, A), 2 * A);
        assert_eq!(extent_for(1, Usage::FileIo, A), 2 * A);
        assert_eq!(extent_for(u64::MAX - 5, Usage::AppDirect, A), u64::MAX);
        assert_eq!(lcm(16 * MIB, 2 * MIB), 16 * MIB);
        assert_eq!(lcm(3, 4), 12);
    }

    /// The region alignment the backend sets (2 MiB on one DIMM).
    const FINE: u64 = 2 * MIB;

    #[test]
    fn round_sizes_are_exact_with_2mib_extents() {
        for want in [512 * MIB, 1 << 30, 2 << 30, 4 << 30, 300 * MIB, 2 * MIB] {
            let e = extent_for(want, Usage::AppDirect, FINE);
            assert_eq!(fsdax_usable(e), want, "{want}");
            assert!(fsdax_usable(e - FINE) < want, "{want}");
        }
        // The numbers: 512 MiB usable is a 522 MiB namespace, which
        // 16 MiB units cannot express (the nearest are 502 and 518 MiB).
        assert_eq!(extent_for(512 * MIB, Usage::AppDirect, FINE), 522 * MIB);
        assert_eq!(extent_for(1 << 30, Usage::AppDirect, FINE), 1042 * MIB);
        assert_eq!(extent_for(512 * MIB, Usage::AppDirect, A), 528 * MIB);
        assert_eq!(fsdax_usable(528 * MIB), 518 * MIB);
        assert_eq!(fsdax_usable(512 * MIB), 502 * MIB);
        // The smallest fsdax volume: 4 MiB holds 2 MiB; 2 MiB holds nothing.
        assert_eq!(fsdax_usable(2 * MIB), 0);
        assert_eq!(extent_for(1, Usage::AppDirect, FINE), 4 * MIB);
    }

    #[test]
    fn sector_sizes_are_never_round() {
        // BTT keeps a 4-byte map entry per 4 KiB block, free blocks, a flog
        // and two info blocks: no 2 MiB extent gives a round size, so a
        // required == limit request of one is answered with the two
        // nearest (the allocator's OutOfRange).
        for want in [512 * MIB, 1 << 30, 2 << 30, 4 << 30] {
            let e = extent_for(want, Usage::FileIo, FINE);
            let (below, above) = (sector_usable(e - FINE), sector_usable(e));
            assert!(below < want && want < above, "{want}: {below} {above}");
        }
        assert_eq!(extent_for(512 * MIB, Usage::FileIo, FINE), 514 * MIB);
        assert_eq!(sector_usable(512 * MIB), 535_265_280);
        assert_eq!(sector_usable(514 * MIB), 537_358_336);
    }

    proptest! {
        /// For any size, extent_for gives the smallest whole number of 2 MiB
        /// units whose usable size holds it.
        #[test]
        fn extent_for_is_the_smallest_that_holds(want in 1u64..(64u64 << 30), fileio: bool) {
            let usage = if fileio { Usage::FileIo } else { Usage::AppDirect };
            let e = extent_for(want, usage, FINE);
            prop_assert!(e.is_multiple_of(FINE));
            prop_assert!(usable(e, usage) >= want);
            prop_assert!(e == FINE || usable(e - FINE, usage) < want);
        }

        /// Every multiple of 2 MiB is an exact fsdax size: required ==
        /// limit of it is servable.
        #[test]
        fn fsdax_serves_every_2mib_multiple(units in 1u64..32_768) {
            let want = units * FINE;
            prop_assert_eq!(fsdax_usable(extent_for(want, Usage::AppDirect, FINE)), want);
        }

        /// extent_for is the exact inverse: what capacity reports for an
        /// extent maps back to that extent (or a smaller one), never more.
        #[test]
        fn inverse(units in 1u64..20_000, fileio: bool, fine: bool) {
            let usage = if fileio { Usage::FileIo } else { Usage::AppDirect };
            let unit = if fine { FINE } else { A };
            let e = units * unit;
            let u = usable(e, usage);
            prop_assume!(u > 0);
            let back = extent_for(u, usage, unit);
            prop_assert!(back <= e);
            prop_assert!(usable(back, usage) >= u);
            prop_assert!(back == unit || usable(back - unit, usage) < u);
        }

        #[test]
        fn monotonic(units in 1u64..20_000) {
            let e = units * A;
            prop_assert!(fsdax_usable(e + A) > fsdax_usable(e));
            prop_assert!(sector_usable(e + A) >= sector_usable(e));
            prop_assert!(fsdax_usable(e) <= e && sector_usable(e) <= e);
        }
    }
}

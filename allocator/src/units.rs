//! Typed sizes. Device arithmetic mixes bytes, sectors and alignments; a
//! newtype keeps byte counts from being confused with anything else.

use std::fmt;
use std::ops::{Add, Sub};

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub u64);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Size of a 512-byte sector, the unit of block-device ioctls.
pub const SECTOR: u64 = 512;

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub const fn mib(n: u64) -> Bytes {
        Bytes(n * MIB)
    }

    pub const fn gib(n: u64) -> Bytes {
        Bytes(n * GIB)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// Rounds up to a multiple of `align` (a power of two or any non-zero
    /// value); `None` on overflow.
    pub fn align_up(self, align: Bytes) -> Option<Bytes> {
        debug_assert!(align.0 > 0);
        let rem = self.0 % align.0;
        if rem == 0 {
            Some(self)
        } else {
            self.0.checked_add(align.0 - rem).map(Bytes)
        }
    }

    /// Rounds down to a multiple of `align`.
    pub fn align_down(self, align: Bytes) -> Bytes {
        debug_assert!(align.0 > 0);
        Bytes(self.0 - self.0 % align.0)
    }

    pub fn is_aligned(self, align: Bytes) -> bool {
        align.0 > 0 && self.0.is_multiple_of(align.0)
    }

    pub fn checked_add(self, other: Bytes) -> Option<Bytes> {
        self.0.checked_add(other.0).map(Bytes)
    }

    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }

    /// Whole 512-byte sectors.
    pub fn sectors(self) -> u64 {
        self.0 / SECTOR
    }
}

impl Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0 + rhs.0)
    }
}

impl Sub for Bytes {
    type Output = Bytes;
    fn sub(self, rhs: Bytes) -> Bytes {
        Bytes(self.0 - rhs.0)
    }
}

impl fmt::Display for Bytes {
    /// Exact binary units when the value is a whole multiple, bytes otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v >= GIB && v.is_multiple_of(GIB) {
            write!(f, "{}GiB", v / GIB)
        } else if v >= MIB && v.is_multiple_of(MIB) {
            write!(f, "{}MiB", v / MIB)
        } else if v >= KIB && v.is_multiple_of(KIB) {
            write!(f, "{}KiB", v / KIB)
        } else {
            write!(f, "{v}B")
        }
    }
}

/// Parses a size with an optional unit: `4096`, `16MiB`, `4GiB`, `1G`, `2Gi`,
/// `500M`, `1T`. Binary suffixes (Ki/Mi/Gi/Ti, KiB/…, K/M/G/T) are powers of
/// 1024; decimal SI suffixes (k, KB, MB, GB, TB) are powers of 1000, as in a
/// Kubernetes quantity.
pub fn parse_size(s: &str) -> Result<Bytes, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit())).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?} does not start with a number"));
    }
    let n: u64 = num
        .parse()
        .map_err(|e| format!("size {s:?} is not a number: {e}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" | "K" => KIB,
        "Mi" | "MiB" | "M" => MIB,
        "Gi" | "GiB" | "G" => GIB,
        "Ti" | "TiB" | "T" => GIB * KIB,
        "k" | "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "TB" => 1000 * 1000 * 1000 * 1000,
        other => return Err(format!("size {s:?} has an unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .map(Bytes)
        .ok_or_else(|| format!("size {s:?} overflows 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_rounds() {
        let a = Bytes::mib(16);
        assert_eq!(Bytes(1).align_up(a), Some(a));
        assert_eq!(a.align_up(a), Some(a));
        assert_eq!(Bytes(a.0 + 1).align_down(a), a);
        assert_eq!(Bytes(u64::MAX).align_up(a), None);
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("2Gi").unwrap(), Bytes::gib(2));
        assert_eq!(parse_size("16MiB").unwrap(), Bytes::mib(16));
        assert_eq!(parse_size("4096").unwrap(), Bytes(4096));
        assert_eq!(parse_size("1G").unwrap(), Bytes::gib(1));
        assert_eq!(parse_size("1GB").unwrap(), Bytes(1_000_000_000));
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("1Qi").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(Bytes::gib(4).to_string(), "4GiB");
        assert_eq!(Bytes::mib(48).to_string(), "48MiB");
        assert_eq!(Bytes(1000).to_string(), "1000B");
    }
}

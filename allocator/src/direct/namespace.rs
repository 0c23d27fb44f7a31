//! Typed views of the libnvdimm device tree in sysfs: regions, DIMMs,
//! namespaces, their claim devices (pfn/btt/dax) and block devices. Every
//! read names the sysfs path it failed on.

use std::io;

use super::sysfs::Sysfs;
use crate::error::{Error, Result};

pub const DEVICES: &str = "bus/nd/devices";
/// nd_pmem serves raw namespaces, fsdax (pfn) and sector (btt) claims.
pub const ND_PMEM_BIND: &str = "bus/nd/drivers/nd_pmem/bind";

/// Region `nstype`: label-less, one namespace covering the region.
pub const NSTYPE_IO: u32 = 4;
/// Region `nstype`: labeled, namespaces carved out by writing `size`.
pub const NSTYPE_PMEM: u32 = 5;

pub fn attr_path(dev: &str, attr: &str) -> String {
    format!("{DEVICES}/{dev}/{attr}")
}

/// Errors a read may legitimately give for an attribute that has no value
/// now (ENXIO on `resource` of an idle namespace) or does not exist (uuid
/// of a label-less namespace).
fn absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO)
}

/// Parses `123` or `0x7b`.
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Reading and writing attributes with context.
#[derive(Debug, Clone, Copy)]
pub struct Tree<'a> {
    pub sys: &'a dyn Sysfs,
}

impl<'a> Tree<'a> {
    pub fn new(sys: &'a dyn Sysfs) -> Tree<'a> {
        Tree { sys }
    }

    pub fn read(&self, dev: &str, attr: &str) -> Result<String> {
        let p = attr_path(dev, attr);
        self.sys
            .read(&p)
            .map_err(|e| Error::io(format!("read {}", self.sys.display(&p)), e))
    }

    /// `None` when the attribute does not exist or has no value now.
    pub fn read_opt(&self, dev: &str, attr: &str) -> Result<Option<String>> {
        let p = attr_path(dev, attr);
        match self.sys.read(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", self.sys.display(&p)), e)),
        }
    }

    pub fn num(&self, dev: &str, attr: &str) -> Result<u64> {
        let v = self.read(dev, attr)?;
        parse_u64(&v).ok_or_else(|| {
            Error::Device(format!(
                "{} is {v:?}, not a number",
                self.sys.display(&attr_path(dev, attr))
            ))
        })
    }

    pub fn num_opt(&self, dev: &str, attr: &str) -> Result<Option<u64>> {
        Ok(self.read_opt(dev, attr)?.and_then(|v| parse_u64(&v)))
    }

    /// Writes an attribute of a device. The error keeps the errno (the
    /// kernel's answer is the diagnosis) and names path and value.
    pub fn write(&self, dev: &str, attr: &str, value: &str) -> Result<(), WriteError> {
        self.write_path(&attr_path(dev, attr), value)
    }

    pub fn write_path(&self, path: &str, value: &str) -> Result<(), WriteError> {
        self.sys.write(path, value).map_err(|source| WriteError {
            path: self.sys.display(path),
            value: value.to_owned(),
            source,
        })
    }

    pub fn devices(&self) -> Result<Vec<String>> {
        let mut v = self
            .sys
            .list(DEVICES)
            .map_err(|e| Error::io(format!("list {}", self.sys.display(DEVICES)), e))?;
        v.sort_by_key(|n| sort_key(n));
        Ok(v)
    }

    /// The driver a device is bound to, if any.
    pub fn driver(&self, dev: &str) -> Result<Option<String>> {
        let p = attr_path(dev, "driver");
        self.sys
            .link(&p)
            .map_err(|e| Error::io(format!("read link {}", self.sys.display(&p)), e))
    }

    pub fn region(&self, name: &str) -> Result<RegionInfo> {
        let mappings = self.num(name, "mappings")?;
        let mut maps = Vec::new();
        for i in 0..mappings {
            let m = self.read(name, &format!("mapping{i}"))?;
            maps.push(Mapping::parse(&m).ok_or_else(|| {
                Error::Device(format!(
                    "{} is {m:?}, not dimm,offset,length,position",
                    self.sys.display(&attr_path(name, &format!("mapping{i}")))
                ))
            })?);
        }
        let numa = self.read_opt(name, "numa_node")?;
        Ok(RegionInfo {
            name: name.to_owned(),
            size: self.num(name, "size")?,
            align: self.num_opt(name, "align")?.unwrap_or(0),
            available: self.num_opt(name, "available_size")?.unwrap_or(0),
            max_extent: self.num_opt(name, "max_available_extent")?.unwrap_or(0),
            nstype: u32::try_from(self.num(name, "nstype")?).unwrap_or(0),
            mappings: maps,
            numa_node: numa.and_then(|n| n.trim().parse().ok()).unwrap_or(-1),
            read_only: self.read_opt(name, "read_only")?.as_deref() == Some("1"),
            resource: self.num_opt(name, "resource")?.unwrap_or(0),
            persistence_domain: self
                .read_opt(name, "persistence_domain")?
                .filter(|s| !s.is_empty()),
            enabled: self.driver(name)?.is_some(),
        })
    }

    pub fn dimm_slots(&self, nmem: &str) -> Result<Option<u32>> {
        Ok(self
            .num_opt(nmem, "available_slots")?
            .and_then(|n| u32::try_from(n).ok()))
    }

    /// Namespaces of a region (by name prefix), in id order.
    pub fn namespaces(&self, region: &str) -> Result<Vec<NamespaceInfo>> {
        let Some(rid) = region.strip_prefix("region") else {
            return Ok(Vec::new());
        };
        let prefix = format!("namespace{rid}.");
        let mut out = Vec::new();
        for d in self
            .devices()?
            .into_iter()
            .filter(|d| d.starts_with(&prefix))
        {
            // A namespace deleted between the listing and the read is gone.
            match self.namespace(&d) {
                Ok(ns) => out.push(ns),
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub fn namespace(&self, name: &str) -> Result<NamespaceInfo> {
        let io = self.read_opt(name, "devtype")?.as_deref() == Some("nd_namespace_io");
        Ok(NamespaceInfo {
            name: name.to_owned(),
            size: self.num(name, "size")?,
            uuid: self.read_opt(name, "uuid")?.filter(|u| !u.is_empty()),
            alt_name: self.read_opt(name, "alt_name")?.unwrap_or_default(),
            resource: self.num_opt(name, "resource")?,
            driver: self.driver(name)?,
            holder: self.read_opt(name, "holder")?.filter(|h| !h.is_empty()),
            mode: self.read_opt(name, "mode")?.unwrap_or_default(),
            force_raw: self.read_opt(name, "force_raw")?.as_deref() == Some("1"),
            io,
        })
    }

    pub fn claim(&self, name: &str) -> Result<ClaimInfo> {
        let kind = ClaimKind::of(name)
            .ok_or_else(|| Error::Device(format!("{name} is not a pfn, btt or dax device")))?;
        Ok(ClaimInfo {
            name: name.to_owned(),
            kind,
            namespace: self.read_opt(name, "namespace")?.unwrap_or_default(),
            bound: self.driver(name)?.is_some(),
        })
    }

    /// The block device a bound namespace or claim device exposes.
    pub fn block(&self, dev: &str) -> Result<Option<BlockInfo>> {
        let dir = attr_path(dev, "block");
        let names = match self.sys.list(&dir) {
            Ok(n) => n,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(Error::io(format!("list {}", self.sys.display(&dir)), e)),
        };
        let Some(name) = names.into_iter().next() else {
            return Ok(None);
        };
        let Some(dev_no) = self.read_opt(dev, &format!("block/{name}/dev"))? else {
            return Ok(None);
        };
        let (major, minor) = dev_no
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| {
                Error::Device(format!(
                    "{} is {dev_no:?}, not major:minor",
                    self.sys.display(&format!("{dir}/{name}/dev"))
                ))
            })?;
        let sectors = self.num(dev, &format!("block/{name}/size"))?;
        Ok(Some(BlockInfo {
            name,
            major,
            minor,
            bytes: sectors * 512,
        }))
    }
}

/// Sorts `namespace0.10` after `namespace0.9`.
fn sort_key(name: &str) -> (String, Vec<u64>) {
    let split = name
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(name.len());
    let (base, nums) = name.split_at(split);
    (
        base.to_owned(),
        nums.split('.').filter_map(|n| n.parse().ok()).collect(),
    )
}

/// A failed attribute write: which file, what value, what the kernel said.
#[derive(Debug)]
pub struct WriteError {
    pub path: String,
    pub value: String,
    pub source: io::Error,
}

impl WriteError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write {:?} to {}: {}",
            self.value, self.path, self.source
        )
    }
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Error {
        Error::Device(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub dimm: String,
    pub dpa: u64,
    pub len: u64,
    pub position: u32,
}

impl Mapping {
    /// `nmem0,0,4294967296,0`.
    fn parse(s: &str) -> Option<Mapping> {
        let mut it = s.trim().split(',');
        let m = Mapping {
            dimm: it.next()?.to_owned(),
            dpa: parse_u64(it.next()?)?,
            len: parse_u64(it.next()?)?,
            position: it.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        };
        Some(m)
    }
}

#[derive(Debug, Clone)]
pub struct RegionInfo {
    pub name: String,
    pub size: u64,
    /// Namespace sizes must be multiples (16 MiB by default).
    pub align: u64,
    pub available: u64,
    pub max_extent: u64,
    pub nstype: u32,
    pub mappings: Vec<Mapping>,
    pub numa_node: i32,
    pub read_only: bool,
    /// Physical base address; namespace offsets are relative to it.
    pub resource: u64,
    pub persistence_domain: Option<String>,
    /// Bound to nd_region (a disabled region has no seeds and no namespaces).
    pub enabled: bool,
}

impl RegionInfo {
    /// Interleave ways.
    pub fn ways(&self) -> u64 {
        (self.mappings.len() as u64).max(1)
    }

    pub fn dimms(&self) -> Vec<String> {
        self.mappings.iter().map(|m| m.dimm.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub size: u64,
    /// Label uuid; `None` on a seed and on label-less namespaces.
    pub uuid: Option<String>,
    pub alt_name: String,
    /// Physical start address; `None` while the namespace has no space.
    pub resource: Option<u64>,
    /// Set when the namespace itself is bound (raw mode).
    pub driver: Option<String>,
    /// The claiming pfn/btt/dax device.
    pub holder: Option<String>,
    pub mode: String,
    pub force_raw: bool,
    /// Label-less (`nd_namespace_io`).
    pub io: bool,
}

impl NamespaceInfo {
    /// Offset of the namespace in its region.
    pub fn offset(&self, region: &RegionInfo) -> Option<u64> {
        self.resource.and_then(|r| r.checked_sub(region.resource))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    Pfn,
    Btt,
    Dax,
}

impl ClaimKind {
    pub fn of(name: &str) -> Option<ClaimKind> {
        if name.starts_with("pfn") {
            Some(ClaimKind::Pfn)
        } else if name.starts_with("btt") {
            Some(ClaimKind::Btt)
        } else if name.starts_with("dax") {
            Some(ClaimKind::Dax)
        } else {
            None
        }
    }

    /// The `holder_class` value ndctl writes for this claim.
    pub fn class(self) -> &'static str {
        match self {
            ClaimKind::Pfn => "pfn",
            ClaimKind::Btt => "btt",
            ClaimKind::Dax => "dax",
        }
    }

    /// The region attribute naming the next idle device of this kind.
    pub fn seed_attr(self) -> &'static str {
        match self {
            ClaimKind::Pfn => "pfn_seed",
            ClaimKind::Btt => "btt_seed",
            ClaimKind::Dax => "dax_seed",
        }
    }

    /// What ndctl calls the mode.
    pub fn mode_name(self) -> &'static str {
        match self {
            ClaimKind::Pfn => "fsdax",
            ClaimKind::Btt => "sector",
            ClaimKind::Dax => "devdax",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    pub name: String,
    pub kind: ClaimKind,
    /// The claimed namespace, empty when idle.
    pub namespace: String,
    pub bound: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub name: String,
    pub major: u32,
    pub minor: u32,
    pub bytes: u64,
}

/// Where the kernel will put a new namespace of `size` bytes: the first
/// hole (lowest offset) between allocated namespaces that holds it, with
/// hole starts rounded up to `align`. This is what libnvdimm's
/// `scan_allocate` does for PMEM (verified in the rig), `None` when no hole
/// is large enough.
pub fn kernel_first_fit(
    region_size: u64,
    align: u64,
    used: &[(u64, u64)],
    size: u64,
) -> Option<u64> {
    let mut used: Vec<(u64, u64)> = used.iter().copied().filter(|&(_, l)| l > 0).collect();
    used.sort_unstable();
    let mut cursor = 0u64;
    for (off, len) in used.into_iter().chain(std::iter::once((region_size, 0))) {
        let start = cursor.div_ceil(align.max(1)) * align.max(1);
        if off >= start && off - start >= size {
            return Some(start);
        }
        cursor = cursor.max(off.saturating_add(len));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_like_the_kernel() {
        const M: u64 = 1 << 20;
        // The rig sequence: 32M at 0, 32M at 32M, 32M at 64M, then the
        // middle one deleted: 64M goes after the end, 16M into the hole.
        let used = [(0, 32 * M), (64 * M, 32 * M)];
        assert_eq!(
            kernel_first_fit(2048 * M, 16 * M, &used, 64 * M),
            Some(96 * M)
        );
        assert_eq!(
            kernel_first_fit(2048 * M, 16 * M, &used, 16 * M),
            Some(32 * M)
        );
        assert_eq!(kernel_first_fit(128 * M, 16 * M, &used, 64 * M), None);
        assert_eq!(kernel_first_fit(128 * M, 16 * M, &[], 128 * M), Some(0));
    }

    #[test]
    fn parses() {
        assert_eq!(parse_u64("0x100000000"), Some(1 << 32));
        assert_eq!(parse_u64("4096"), Some(4096));
        assert_eq!(
            Mapping::parse("nmem0,0,4294967296,0"),
            Some(Mapping {
                dimm: "nmem0".into(),
                dpa: 0,
                len: 1 << 32,
                position: 0
            })
        );
        let mut v = vec!["namespace0.10", "namespace0.9", "namespace0.0"];
        v.sort_by_key(|n| sort_key(n));
        assert_eq!(v, ["namespace0.0", "namespace0.9", "namespace0.10"]);
    }
}

//! An in-memory model of libnvdimm's sysfs interface, for tests of the
//! direct backend without a kernel. It implements [`Sysfs`] and
//! [`BlockDevices`] with the semantics observed in the QEMU rig (Debian's
//! 6.1 kernel, labels v1.1; see shared/reference/libnvdimm-sysfs.md):
//!
//! - a region has one idle seed namespace and one idle pfn/btt/dax seed;
//!   a seed is replaced (lowest free id) only after a successful bind;
//! - `size` needs a uuid (ENXIO), an idle namespace (EBUSY), a multiple of
//!   the region alignment (EINVAL) and no more than `max_available_extent`
//!   (ENOSPC); space is taken first-fit by offset; `size` 0 deletes a
//!   namespace unless it is the seed or has id 0;
//! - uuid, alt_name, sector_size and holder_class are EBUSY while the
//!   namespace is bound or claimed; a duplicate uuid is EINVAL;
//! - a claim device needs uuid and namespace; pfn also a mode (ENXIO on
//!   `none`); btt refuses namespaces under 16 MiB + 4 KiB (ENXIO); a failed
//!   bind leaves the claim attached;
//! - clearing a claim's namespace deletes the claim unless it is the seed;
//! - binding writes an info block to the media; binding the namespace raw
//!   without `force_raw` then auto-probes a new claim and fails with ENXIO;
//! - a region's `align` (namespace size granularity and hole start
//!   alignment) boots as 16 MiB (4 KiB for regions under 16 MiB) and is
//!   writable at any time: a power of two of at least 4 KiB per DIMM, no
//!   larger than the region (EINVAL otherwise); it is not persistent;
//! - a pfn/dax bind lays out the info block, the page map (mode `pmem`:
//!   64 bytes per 4 KiB page on the device; `ram`: none) and the data the
//!   way `nd_pfn_init` does: the namespace start must be 2 MiB aligned
//!   (EINVAL), the data offset and the end are aligned to max(pfn `align`,
//!   2 MiB), an offset past the end is ENXIO; the info block records the
//!   offset, so a reprobe gives the same size;
//! - a "reboot" keeps what the labels and info blocks describe.
//!
//! Growing or shrinking an allocated namespace is not modelled (EOPNOTSUPP).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::layout;
use super::namespace::{ClaimKind, kernel_first_fit};
use super::sysfs::{BlockDevices, Sysfs};

const MIB: u64 = 1 << 20;
const DEVICES: &str = "bus/nd/devices/";
const DRIVER: &str = "bus/nd/drivers/nd_pmem/";
/// Major number of pmem block devices (blkext).
const BLOCK_MAJOR: u32 = 259;
const PFN_ALIGNMENTS: [u64; 3] = [4096, 2 * MIB, 1 << 30];
const PAGE: u64 = 4096;
/// `memremap_compat_align()` on x86-64: the subsection size.
const COMPAT_ALIGN: u64 = 2 * MIB;
/// The info block area a pfn/dax device keeps before its page map.
const PFN_INFO: u64 = 8192;
/// `MAX_STRUCT_PAGE_SIZE`: what the kernel reserves per page with mode pmem.
const STRUCT_PAGE: u64 = 64;
/// `MEMREMAP_COMPAT_ALIGN_MAX`: the region alignment the kernel boots with.
const BOOT_ALIGN: u64 = 16 * MIB;
const BTT_SECTOR_SIZES: [u32; 7] = [512, 520, 528, 4096, 4104, 4160, 4224];

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

#[derive(Debug, Clone)]
struct Region {
    id: u32,
    size: u64,
    /// Namespace alignment (`align`); reset to [`default_align`] at boot.
    align: u64,
    /// Interleave ways (`mappings`).
    mappings: u32,
    resource: u64,
    labeled: bool,
    dimm: usize,
    numa: i32,
    read_only: bool,
    ns_seed: u32,
    /// pfn, btt, dax.
    seeds: [u32; 3],
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    name: String,
    minor: u32,
    bytes: u64,
}

#[derive(Debug, Clone)]
struct Ns {
    uuid: Option<String>,
    alt_name: String,
    size: u64,
    offset: u64,
    sector_size: u32,
    holder_class: String,
    force_raw: bool,
    block: Option<Block>,
    claim: Option<String>,
    io: bool,
}

impl Ns {
    fn idle() -> Ns {
        Ns {
            uuid: None,
            alt_name: String::new(),
            size: 0,
            offset: 0,
            sector_size: 512,
            holder_class: String::new(),
            force_raw: false,
            block: None,
            claim: None,
            io: false,
        }
    }

    fn busy(&self) -> bool {
        self.block.is_some() || self.claim.is_some()
    }
}

#[derive(Debug, Clone)]
struct Claim {
    kind: ClaimKind,
    uuid: Option<String>,
    mode: String,
    align: u64,
    sector_size: u32,
    namespace: Option<String>,
    block: Option<Block>,
}

impl Claim {
    fn idle(kind: ClaimKind) -> Claim {
        Claim {
            kind,
            uuid: None,
            mode: "none".into(),
            align: 2 * MIB,
            sector_size: 4096,
            namespace: None,
            block: None,
        }
    }
}

/// What a successful claim bind leaves at the start of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InfoBlock {
    kind: ClaimKind,
    parent_uuid: String,
    /// Bytes the claim's block device exposes (pfn/dax: from `dataoff`
    /// and `end_trunc` as written at the first bind).
    bytes: u64,
}

/// The region alignment a region boots with (`default_align`).
fn default_align(size: u64, mappings: u32) -> u64 {
    let align = if size < BOOT_ALIGN { PAGE } else { BOOT_ALIGN };
    let ways = u64::from(mappings.max(1));
    if align % ways == 0 {
        align
    } else {
        align * ways
    }
}

/// `kstrtoul(buf, 0, ..)`: decimal, `0x` hex or `0` octal, one trailing
/// newline allowed.
fn kstrtoul(value: &str) -> Option<u64> {
    let v = value.strip_suffix('\n').unwrap_or(value);
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1
        && let Some(o) = v.strip_prefix('0')
    {
        u64::from_str_radix(o, 8).ok()
    } else {
        v.parse().ok()
    }
}

/// The fsdax/devdax layout `nd_pfn_init` writes for a namespace at physical
/// address `start` of `size` bytes: (data offset, bytes truncated at the
/// end), or the errno of the refused bind.
fn pfn_layout(start: u64, size: u64, mode: &str, pfn_align: u64) -> Result<(u64, u64), i32> {
    let align = pfn_align.max(COMPAT_ALIGN);
    if !start.is_multiple_of(COMPAT_ALIGN) {
        return Err(libc::EINVAL);
    }
    let npfns = size.saturating_sub(PFN_INFO) / PAGE;
    let end = start + size;
    let end_trunc = end - end / align * align;
    let first = match mode {
        "pmem" => start + PFN_INFO + STRUCT_PAGE * npfns,
        "ram" => start + PFN_INFO,
        _ => return Err(libc::ENXIO),
    };
    let offset = first.div_ceil(align) * align - start;
    if offset >= size {
        return Err(libc::ENXIO);
    }
    Ok((offset, end_trunc))
}

#[derive(Debug, Default)]
struct State {
    /// Label slots of each DIMM.
    dimms: Vec<u32>,
    regions: Vec<Region>,
    /// Keyed by (region, id).
    namespaces: BTreeMap<(u32, u32), Ns>,
    /// Keyed by (kind index, region, id).
    claims: BTreeMap<(usize, u32, u32), Claim>,
    /// Info blocks by (region, namespace offset).
    media: BTreeMap<(u32, u64), InfoBlock>,
    read_only: bool,
    busy: BTreeSet<String>,
    next_minor: u32,
    writes: Vec<(String, String)>,
    zeroed: Vec<(String, u64, u64, bool)>,
    fail: Vec<(String, i32)>,
    fail_zero: bool,
    /// How many more `udev_settled` polls answer "not yet".
    udev_lag: u32,
}

fn kind_index(k: ClaimKind) -> usize {
    match k {
        ClaimKind::Pfn => 0,
        ClaimKind::Btt => 1,
        ClaimKind::Dax => 2,
    }
}

const KINDS: [ClaimKind; 3] = [ClaimKind::Pfn, ClaimKind::Btt, ClaimKind::Dax];

fn claim_name(kind: usize, r: u32, id: u32) -> String {
    format!("{}{r}.{id}", KINDS[kind].class())
}

/// `pmem0`, `pmem0.1`, `pmem0.1s`: the kernel names disks after the namespace.
fn disk_name(r: u32, id: u32, sector: bool) -> String {
    let base = if id == 0 {
        format!("pmem{r}")
    } else {
        format!("pmem{r}.{id}")
    };
    if sector { format!("{base}s") } else { base }
}

enum Dev {
    Bus,
    Dimm(usize),
    Region(u32),
    Ns(u32, u32),
    Claim(usize, u32, u32),
}

fn parse_dev(name: &str) -> Option<Dev> {
    let pair = |s: &str| -> Option<(u32, u32)> {
        let (a, b) = s.split_once('.')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    if name == "ndbus0" {
        Some(Dev::Bus)
    } else if let Some(n) = name.strip_prefix("nmem") {
        n.parse().ok().map(Dev::Dimm)
    } else if let Some(n) = name.strip_prefix("region") {
        n.parse().ok().map(Dev::Region)
    } else if let Some(n) = name.strip_prefix("namespace") {
        pair(n).map(|(r, i)| Dev::Ns(r, i))
    } else {
        KINDS.iter().enumerate().find_map(|(k, kind)| {
            let (r, i) = pair(name.strip_prefix(kind.class())?)?;
            Some(Dev::Claim(k, r, i))
        })
    }
}

impl State {
    fn region(&self, r: u32) -> io::Result<&Region> {
        self.regions
            .get(r as usize)
            .ok_or_else(|| err(libc::ENODEV))
    }

    fn used(&self, r: u32) -> Vec<(u64, u64)> {
        self.namespaces
            .iter()
            .filter(|((nr, _), ns)| *nr == r && ns.size > 0 && !ns.io)
            .map(|(_, ns)| (ns.offset, ns.size))
            .collect()
    }

    fn max_extent(&self, r: u32) -> u64 {
        let reg = &self.regions[r as usize];
        let mut used = self.used(r);
        used.sort_unstable();
        let mut best = 0;
        let mut cursor = 0u64;
        for (o, l) in used.into_iter().chain(std::iter::once((reg.size, 0))) {
            let start = cursor.div_ceil(reg.align) * reg.align;
            if o > start {
                best = best.max((o - start) / reg.align * reg.align);
            }
            cursor = cursor.max(o + l);
        }
        best
    }

    fn available(&self, r: u32) -> u64 {
        let reg = &self.regions[r as usize];
        reg.size - self.used(r).iter().map(|&(_, l)| l).sum::<u64>()
    }

    fn slots_free(&self, dimm: usize) -> u32 {
        let used = self
            .namespaces
            .iter()
            .filter(|((r, _), ns)| ns.size > 0 && !ns.io && self.regions[*r as usize].dimm == dimm)
            .count();
        self.dimms[dimm].saturating_sub(u32::try_from(used).unwrap_or(u32::MAX))
    }

    fn lowest_free_ns(&self, r: u32) -> u32 {
        (0..)
            .find(|i| !self.namespaces.contains_key(&(r, *i)))
            .unwrap_or(0)
    }

    fn lowest_free_claim(&self, k: usize, r: u32) -> u32 {
        (0..)
            .find(|i| !self.claims.contains_key(&(k, r, *i)))
            .unwrap_or(0)
    }

    fn new_ns_seed(&mut self, r: u32) {
        let id = self.lowest_free_ns(r);
        self.namespaces.insert((r, id), Ns::idle());
        self.regions[r as usize].ns_seed = id;
    }

    fn new_claim_seed(&mut self, k: usize, r: u32) {
        let id = self.lowest_free_claim(k, r);
        self.claims.insert((k, r, id), Claim::idle(KINDS[k]));
        self.regions[r as usize].seeds[k] = id;
    }

    fn block(&mut self, name: String, bytes: u64) -> Block {
        let minor = self.next_minor;
        self.next_minor += 1;
        Block { name, minor, bytes }
    }

    fn ns_name_of(&self, value: &str) -> io::Result<(u32, u32)> {
        match parse_dev(value) {
            Some(Dev::Ns(r, i)) if self.namespaces.contains_key(&(r, i)) => Ok((r, i)),
            _ => Err(err(libc::ENODEV)),
        }
    }

    fn all_devices(&self) -> Vec<String> {
        let mut v = vec!["ndbus0".to_owned()];
        v.extend((0..self.dimms.len()).map(|d| format!("nmem{d}")));
        v.extend(self.regions.iter().map(|r| format!("region{}", r.id)));
        v.extend(
            self.namespaces
                .keys()
                .map(|(r, i)| format!("namespace{r}.{i}")),
        );
        v.extend(self.claims.keys().map(|&(k, r, i)| claim_name(k, r, i)));
        v.sort();
        v
    }

    fn read(&self, path: &str) -> io::Result<String> {
        let rest = path
            .strip_prefix(DEVICES)
            .ok_or_else(|| err(libc::ENOENT))?;
        let (dev, attr) = rest.split_once('/').ok_or_else(|| err(libc::EISDIR))?;
        match parse_dev(dev).ok_or_else(|| err(libc::ENOENT))? {
            Dev::Bus => match attr {
                "provider" => Ok("ACPI.NFIT".into()),
                "wait_probe" => Ok("0".into()),
                _ => Err(err(libc::ENOENT)),
            },
            Dev::Dimm(d) if d < self.dimms.len() => match attr {
                "available_slots" => Ok(self.slots_free(d).to_string()),
                "dev" => Ok(format!("245:{d}")),
                "state" => Ok("active".into()),
                _ => Err(err(libc::ENOENT)),
            },
            Dev::Region(r) => self.read_region(self.region(r)?, attr),
            Dev::Ns(r, i) => {
                let ns = self
                    .namespaces
                    .get(&(r, i))
                    .ok_or_else(|| err(libc::ENOENT))?;
                self.read_ns(self.region(r)?, ns, attr)
            }
            Dev::Claim(k, r, i) => {
                let c = self
                    .claims
                    .get(&(k, r, i))
                    .ok_or_else(|| err(libc::ENOENT))?;
                self.read_claim(c, attr)
            }
            Dev::Dimm(_) => Err(err(libc::ENOENT)),
        }
    }

    fn read_region(&self, reg: &Region, attr: &str) -> io::Result<String> {
        let r = reg.id;
        Ok(match attr {
            "size" => reg.size.to_string(),
            "align" => format!("{:#x}", reg.align),
            "available_size" => self.available(r).to_string(),
            "max_available_extent" => self.max_extent(r).to_string(),
            "nstype" => if reg.labeled { "5" } else { "4" }.into(),
            "mappings" => reg.mappings.to_string(),
            "mapping0" => format!("nmem{},0,{},0", reg.dimm, reg.size),
            "namespace_seed" => format!("namespace{r}.{}", reg.ns_seed),
            "pfn_seed" => claim_name(0, r, reg.seeds[0]),
            "btt_seed" => claim_name(1, r, reg.seeds[1]),
            "dax_seed" => claim_name(2, r, reg.seeds[2]),
            "resource" => format!("{:#x}", reg.resource),
            "numa_node" | "target_node" => reg.numa.to_string(),
            "read_only" => u8::from(reg.read_only).to_string(),
            "devtype" => "nd_pmem".into(),
            "set_cookie" => "0x2468ac00123456".into(),
            _ => return Err(err(libc::ENOENT)),
        })
    }

    fn read_ns(&self, reg: &Region, ns: &Ns, attr: &str) -> io::Result<String> {
        let claim_kind = ns.claim.as_deref().and_then(ClaimKind::of);
        Ok(match attr {
            "uuid" | "alt_name" | "sector_size" if ns.io => return Err(err(libc::ENOENT)),
            "uuid" => ns.uuid.clone().unwrap_or_default(),
            "alt_name" => ns.alt_name.clone(),
            "sector_size" => {
                if ns.sector_size == 512 {
                    "[512] 4096".into()
                } else {
                    "512 [4096]".into()
                }
            }
            "size" => ns.size.to_string(),
            "resource" if ns.size == 0 => return Err(err(libc::ENXIO)),
            "resource" => format!("{:#x}", reg.resource + ns.offset),
            "holder" => ns.claim.clone().unwrap_or_default(),
            "holder_class" => ns.holder_class.clone(),
            "mode" => match claim_kind {
                Some(ClaimKind::Pfn) => "memory",
                Some(ClaimKind::Btt) => "safe",
                Some(ClaimKind::Dax) => "dax",
                None => "raw",
            }
            .into(),
            "force_raw" => u8::from(ns.force_raw).to_string(),
            "nstype" => if ns.io { "4" } else { "5" }.into(),
            "devtype" => if ns.io {
                "nd_namespace_io"
            } else {
                "nd_namespace_pmem"
            }
            .into(),
            "numa_node" => reg.numa.to_string(),
            _ => return read_block(ns.block.as_ref(), attr),
        })
    }

    fn read_claim(&self, c: &Claim, attr: &str) -> io::Result<String> {
        let btt = c.kind == ClaimKind::Btt;
        Ok(match attr {
            "uuid" => c.uuid.clone().unwrap_or_default(),
            "mode" | "align" | "supported_alignments" if btt => return Err(err(libc::ENOENT)),
            "mode" => c.mode.clone(),
            "align" => c.align.to_string(),
            "supported_alignments" => "4096 2097152 1073741824".into(),
            "sector_size" if !btt => return Err(err(libc::ENOENT)),
            "sector_size" => BTT_SECTOR_SIZES
                .iter()
                .map(|&s| {
                    if s == c.sector_size {
                        format!("[{s}]")
                    } else {
                        s.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            "namespace" => c.namespace.clone().unwrap_or_default(),
            "size" => match &c.block {
                Some(b) => b.bytes.to_string(),
                None => return Err(err(libc::ENXIO)),
            },
            "devtype" => format!("nd_{}", c.kind.class()),
            _ => return read_block(c.block.as_ref(), attr),
        })
    }

    fn write(&mut self, path: &str, value: &str) -> io::Result<()> {
        if self.read_only {
            return Err(err(libc::EROFS));
        }
        if let Some(i) = self
            .fail
            .iter()
            .position(|(p, _)| path.ends_with(p.as_str()))
        {
            let (_, code) = self.fail.remove(i);
            return Err(err(code));
        }
        if let Some(op) = path.strip_prefix(DRIVER) {
            return match op {
                "bind" => self.bind(value),
                "unbind" => self.unbind(value),
                _ => Err(err(libc::ENOENT)),
            };
        }
        let rest = path
            .strip_prefix(DEVICES)
            .ok_or_else(|| err(libc::ENOENT))?;
        let (dev, attr) = rest.split_once('/').ok_or_else(|| err(libc::EISDIR))?;
        if attr == "driver/unbind" {
            return if value == dev {
                self.unbind(dev)
            } else {
                Err(err(libc::ENODEV))
            };
        }
        match parse_dev(dev).ok_or_else(|| err(libc::ENOENT))? {
            Dev::Ns(r, i) => self.write_ns(r, i, attr, value),
            Dev::Claim(k, r, i) => self.write_claim((k, r, i), attr, value),
            Dev::Region(r) if attr == "align" => self.write_region_align(r, value),
            _ => Err(err(libc::EACCES)),
        }
    }

    /// `align_store`: no check of the namespaces already allocated (they
    /// keep their place; only new allocations follow the new value).
    fn write_region_align(&mut self, r: u32, value: &str) -> io::Result<()> {
        let reg = self.region(r)?;
        let val = kstrtoul(value).ok_or_else(|| err(libc::EINVAL))?;
        let ways = u64::from(reg.mappings);
        if ways == 0 {
            return Err(err(libc::ENXIO));
        }
        let dpa = val / ways;
        if val > reg.size || val % ways != 0 || !dpa.is_power_of_two() || dpa < PAGE {
            return Err(err(libc::EINVAL));
        }
        self.regions[r as usize].align = val;
        Ok(())
    }

    fn write_ns(&mut self, r: u32, i: u32, attr: &str, value: &str) -> io::Result<()> {
        let reg = self.region(r)?.clone();
        let is_seed = reg.ns_seed == i;
        let dup = self
            .namespaces
            .iter()
            .any(|(k, n)| *k != (r, i) && n.uuid.as_deref() == Some(&value.to_ascii_lowercase()));
        let max_extent = self.max_extent(r);
        let slots = self.slots_free(reg.dimm);
        let ns = self
            .namespaces
            .get_mut(&(r, i))
            .ok_or_else(|| err(libc::ENOENT))?;
        if ns.io && matches!(attr, "uuid" | "alt_name" | "sector_size") {
            return Err(err(libc::ENOENT));
        }
        match attr {
            "force_raw" => {
                ns.force_raw = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(err(libc::EINVAL)),
                };
                return Ok(());
            }
            "uuid" | "alt_name" | "sector_size" | "holder_class" | "size" if ns.busy() => {
                return Err(err(libc::EBUSY));
            }
            "uuid" => {
                let u = uuid::Uuid::parse_str(value).map_err(|_| err(libc::EINVAL))?;
                if dup {
                    return Err(err(libc::EINVAL));
                }
                ns.uuid = Some(u.hyphenated().to_string());
            }
            "alt_name" => {
                if value.len() >= 64 {
                    return Err(err(libc::EINVAL));
                }
                ns.alt_name = value.trim().to_owned();
            }
            "sector_size" => {
                ns.sector_size = match value {
                    "512" => 512,
                    "4096" => 4096,
                    _ => return Err(err(libc::EINVAL)),
                };
            }
            "holder_class" => {
                if !matches!(value, "" | "btt" | "pfn" | "dax") {
                    return Err(err(libc::EINVAL));
                }
                ns.holder_class = value.to_owned();
            }
            "size" if ns.io => return Err(err(libc::EACCES)),
            "size" => {
                let val = super::namespace::parse_u64(value).ok_or_else(|| err(libc::EINVAL))?;
                if ns.uuid.is_none() {
                    return Err(err(libc::ENXIO));
                }
                if !val.is_multiple_of(reg.align) {
                    return Err(err(libc::EINVAL));
                }
                if val > max_extent + ns.size {
                    return Err(err(libc::ENOSPC));
                }
                if val == ns.size {
                    // The kernel frees the uuid on any write of 0.
                    if val == 0 {
                        ns.uuid = None;
                    }
                    return Ok(());
                }
                if val == 0 {
                    ns.size = 0;
                    ns.uuid = None;
                    if i != 0 && !is_seed {
                        self.namespaces.remove(&(r, i));
                    }
                    return Ok(());
                }
                if ns.size != 0 {
                    return Err(err(libc::EOPNOTSUPP));
                }
                if slots == 0 {
                    return Err(err(libc::ENOSPC));
                }
                let used = self.used(r);
                let off = kernel_first_fit(reg.size, reg.align, &used, val)
                    .ok_or_else(|| err(libc::ENXIO))?;
                let ns = self
                    .namespaces
                    .get_mut(&(r, i))
                    .ok_or_else(|| err(libc::ENOENT))?;
                ns.size = val;
                ns.offset = off;
            }
            _ => return Err(err(libc::EACCES)),
        }
        Ok(())
    }

    fn write_claim(&mut self, key: (usize, u32, u32), attr: &str, value: &str) -> io::Result<()> {
        let (k, r, _) = key;
        let is_seed = self.region(r)?.seeds[k] == key.2;
        let c = self.claims.get_mut(&key).ok_or_else(|| err(libc::ENOENT))?;
        let btt = c.kind == ClaimKind::Btt;
        if c.block.is_some()
            && matches!(
                attr,
                "uuid" | "mode" | "align" | "sector_size" | "namespace"
            )
        {
            return Err(err(libc::EBUSY));
        }
        match attr {
            "uuid" => {
                let u = uuid::Uuid::parse_str(value).map_err(|_| err(libc::EINVAL))?;
                c.uuid = Some(u.hyphenated().to_string());
            }
            "mode" if !btt => {
                if !matches!(value, "none" | "pmem" | "ram") {
                    return Err(err(libc::EINVAL));
                }
                c.mode = value.to_owned();
            }
            "align" if !btt => {
                let a = value.parse().map_err(|_| err(libc::EINVAL))?;
                if !PFN_ALIGNMENTS.contains(&a) {
                    return Err(err(libc::EINVAL));
                }
                c.align = a;
            }
            "sector_size" if btt => {
                let s = value.parse().map_err(|_| err(libc::EINVAL))?;
                if !BTT_SECTOR_SIZES.contains(&s) {
                    return Err(err(libc::EINVAL));
                }
                c.sector_size = s;
            }
            "namespace" if value.is_empty() => {
                if let Some(ns) = c.namespace.take() {
                    let (nr, ni) = self.ns_name_of(&ns)?;
                    if let Some(n) = self.namespaces.get_mut(&(nr, ni)) {
                        n.claim = None;
                    }
                }
                // An idle claim device that is not the seed goes away.
                if !is_seed {
                    self.claims.remove(&key);
                }
            }
            "namespace" => {
                let (nr, ni) = self.ns_name_of(value)?;
                let me = claim_name(key.0, key.1, key.2);
                let ns = &self.namespaces[&(nr, ni)];
                if nr != r || ns.block.is_some() {
                    return Err(err(libc::EBUSY));
                }
                if ns.claim.as_ref().is_some_and(|c| *c != me) {
                    return Err(err(libc::EBUSY));
                }
                let c = self.claims.get_mut(&key).ok_or_else(|| err(libc::ENOENT))?;
                if c.namespace.as_ref().is_some_and(|n| n != value) {
                    return Err(err(libc::EBUSY));
                }
                c.namespace = Some(value.to_owned());
                if let Some(n) = self.namespaces.get_mut(&(nr, ni)) {
                    n.claim = Some(me);
                }
            }
            _ => return Err(err(libc::ENOENT)),
        }
        Ok(())
    }

    fn bind(&mut self, name: &str) -> io::Result<()> {
        match parse_dev(name).ok_or_else(|| err(libc::ENODEV))? {
            Dev::Ns(r, i) => self.bind_ns(r, i),
            Dev::Claim(k, r, i) => self.bind_claim((k, r, i)),
            _ => Err(err(libc::ENODEV)),
        }
    }

    fn bind_ns(&mut self, r: u32, i: u32) -> io::Result<()> {
        let ns = self
            .namespaces
            .get(&(r, i))
            .ok_or_else(|| err(libc::ENODEV))?;
        if ns.block.is_some() {
            return Err(err(libc::EBUSY));
        }
        if ns.claim.is_some() {
            return Err(err(libc::ENXIO));
        }
        if ns.size == 0 {
            return Err(err(libc::ENODEV));
        }
        let info = self.media.get(&(r, ns.offset)).cloned();
        if !ns.force_raw
            && let Some(info) = info.filter(|b| Some(&b.parent_uuid) == ns.uuid.as_ref())
        {
            // nd_pmem probes for an info block first and hands the
            // namespace to a new claim device; the raw bind fails.
            let k = kind_index(info.kind);
            let id = self.lowest_free_claim(k, r);
            let ns_name = format!("namespace{r}.{i}");
            let block = self.block(disk_name(r, i, info.kind == ClaimKind::Btt), info.bytes);
            let mut c = Claim::idle(info.kind);
            c.uuid = Some(uuid::Uuid::new_v4().hyphenated().to_string());
            c.mode = "pmem".into();
            c.namespace = Some(ns_name);
            c.block = Some(block);
            self.claims.insert((k, r, id), c);
            if let Some(n) = self.namespaces.get_mut(&(r, i)) {
                n.claim = Some(claim_name(k, r, id));
            }
            return Err(err(libc::ENXIO));
        }
        let size = ns.size;
        let block = self.block(disk_name(r, i, false), size);
        if let Some(n) = self.namespaces.get_mut(&(r, i)) {
            n.block = Some(block);
        }
        if self.regions[r as usize].ns_seed == i {
            self.new_ns_seed(r);
        }
        Ok(())
    }

    fn bind_claim(&mut self, key: (usize, u32, u32)) -> io::Result<()> {
        let (k, r, id) = key;
        let c = self.claims.get(&key).ok_or_else(|| err(libc::ENODEV))?;
        if c.block.is_some() {
            return Err(err(libc::EBUSY));
        }
        let (Some(ns_name), Some(_)) = (c.namespace.clone(), c.uuid.as_ref()) else {
            return Err(err(libc::ENODEV));
        };
        let (nr, ni) = self.ns_name_of(&ns_name)?;
        let ns = &self.namespaces[&(nr, ni)];
        if ns.size == 0 || (c.kind != ClaimKind::Btt && c.mode == "none") {
            return Err(err(libc::ENXIO));
        }
        let bytes = match c.kind {
            ClaimKind::Btt => layout::sector_usable(ns.size),
            ClaimKind::Pfn | ClaimKind::Dax => {
                let start = self.regions[r as usize].resource + ns.offset;
                let (offset, end_trunc) =
                    pfn_layout(start, ns.size, &c.mode, c.align).map_err(err)?;
                ns.size - offset - end_trunc
            }
        };
        if bytes == 0 {
            return Err(err(libc::ENXIO));
        }
        let kind = c.kind;
        let parent_uuid = ns.uuid.clone().unwrap_or_default();
        let offset = ns.offset;
        let block = self.block(disk_name(r, ni, kind == ClaimKind::Btt), bytes);
        if let Some(c) = self.claims.get_mut(&key) {
            c.block = Some(block);
        }
        self.media.insert(
            (r, offset),
            InfoBlock {
                kind,
                parent_uuid,
                bytes,
            },
        );
        if self.regions[r as usize].seeds[k] == id {
            self.new_claim_seed(k, r);
        }
        if self.regions[r as usize].ns_seed == ni {
            self.new_ns_seed(r);
        }
        Ok(())
    }

    fn unbind(&mut self, name: &str) -> io::Result<()> {
        match parse_dev(name).ok_or_else(|| err(libc::ENODEV))? {
            Dev::Ns(r, i) => {
                let ns = self
                    .namespaces
                    .get_mut(&(r, i))
                    .ok_or_else(|| err(libc::ENODEV))?;
                ns.block.take().map(|_| ()).ok_or_else(|| err(libc::ENODEV))
            }
            Dev::Claim(k, r, i) => {
                let c = self
                    .claims
                    .get_mut(&(k, r, i))
                    .ok_or_else(|| err(libc::ENODEV))?;
                c.block.take().map(|_| ()).ok_or_else(|| err(libc::ENODEV))
            }
            _ => Err(err(libc::ENODEV)),
        }
    }

    fn blocks(&self) -> impl Iterator<Item = (&Block, Option<(u32, u32)>)> {
        let ns = self
            .namespaces
            .iter()
            .filter_map(|(k, n)| n.block.as_ref().map(|b| (b, Some(*k))));
        let claims = self
            .claims
            .values()
            .filter_map(|c| c.block.as_ref().map(|b| (b, None)));
        ns.chain(claims)
    }
}

fn read_block(block: Option<&Block>, attr: &str) -> io::Result<String> {
    let b = block.ok_or_else(|| err(libc::ENOENT))?;
    let rest = attr
        .strip_prefix("block/")
        .and_then(|r| r.strip_prefix(b.name.as_str()))
        .ok_or_else(|| err(libc::ENOENT))?;
    match rest {
        "/dev" => Ok(format!("{BLOCK_MAJOR}:{}", b.minor)),
        "/size" => Ok((b.bytes / 512).to_string()),
        _ => Err(err(libc::ENOENT)),
    }
}

/// The model. Cheap to build; every test gets its own.
#[derive(Debug, Default)]
pub struct Model {
    st: Mutex<State>,
}

impl Model {
    pub fn new() -> Model {
        Model::default()
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_region(&self, size: u64, labeled: bool) -> String {
        let mut st = self.st();
        let r = u32::try_from(st.regions.len()).unwrap_or(u32::MAX);
        st.dimms.push(if labeled { 1019 } else { 509 });
        let dimm = st.dimms.len() - 1;
        st.regions.push(Region {
            id: r,
            size,
            align: default_align(size, 1),
            mappings: 1,
            resource: (4 << 30) * (u64::from(r) + 1),
            labeled,
            dimm,
            numa: 0,
            read_only: false,
            ns_seed: 0,
            seeds: [0; 3],
        });
        for k in 0..3 {
            st.new_claim_seed(k, r);
        }
        let mut ns = Ns::idle();
        if !labeled {
            // Label-less: one raw namespace over the region, bound at boot.
            ns.io = true;
            ns.size = size;
            ns.block = Some(st.block(disk_name(r, 0, false), size));
        }
        st.namespaces.insert((r, 0), ns);
        format!("region{r}")
    }

    /// A labeled region (nstype 5) of `size` bytes, booted 16 MiB aligned.
    pub fn labeled_region(&self, size: u64) -> String {
        self.add_region(size, true)
    }

    /// A label-less region (nstype 4) with its whole-region raw namespace.
    pub fn labelless_region(&self, size: u64) -> String {
        self.add_region(size, false)
    }

    pub fn set_numa(&self, region: u32, node: i32) {
        self.st().regions[region as usize].numa = node;
    }

    pub fn set_region_read_only(&self, region: u32, ro: bool) {
        self.st().regions[region as usize].read_only = ro;
    }

    pub fn set_dimm_slots(&self, dimm: usize, slots: u32) {
        self.st().dimms[dimm] = slots;
    }

    /// A read-only mount of the whole tree.
    pub fn set_read_only(&self, ro: bool) {
        self.st().read_only = ro;
    }

    /// Marks block device `name` as mounted (O_EXCL opens fail).
    pub fn set_busy(&self, name: &str, busy: bool) {
        let mut st = self.st();
        if busy {
            st.busy.insert(name.to_owned());
        } else {
            st.busy.remove(name);
        }
    }

    /// The next write to a path ending in `suffix` fails with `errno`.
    pub fn fail_next_write(&self, suffix: &str, errno: i32) {
        self.st().fail.push((suffix.to_owned(), errno));
    }

    /// The next zeroing of a block device fails with EIO.
    pub fn fail_next_zero(&self) {
        self.st().fail_zero = true;
    }

    /// udevd answers "not processed yet" to the next `polls` checks.
    pub fn set_udev_lag(&self, polls: u32) {
        self.st().udev_lag = polls;
    }

    pub fn udev_lag(&self) -> u32 {
        self.st().udev_lag
    }

    /// Every successful or failed write so far: (path, value).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.st().writes.clone()
    }

    /// Every zeroing: (device, offset, length, verified).
    pub fn zeroed(&self) -> Vec<(String, u64, u64, bool)> {
        self.st().zeroed.clone()
    }

    /// Namespaces with space: (name, offset in region, size, alt_name, mode).
    pub fn namespaces(&self) -> Vec<(String, u64, u64, String, String)> {
        let st = self.st();
        st.namespaces
            .iter()
            .filter(|(_, n)| n.size > 0)
            .map(|((r, i), n)| {
                let mode = st
                    .read_ns(&st.regions[*r as usize], n, "mode")
                    .unwrap_or_default();
                (
                    format!("namespace{r}.{i}"),
                    n.offset,
                    n.size,
                    n.alt_name.clone(),
                    mode,
                )
            })
            .collect()
    }

    /// Everything an undo must restore: namespaces with their claims,
    /// claim attachments, seeds and info blocks, but not minor numbers.
    pub fn snapshot(&self) -> String {
        let st = self.st();
        let ns: Vec<_> = st
            .namespaces
            .iter()
            .map(|(k, n)| {
                (
                    *k,
                    n.uuid.is_some(),
                    n.alt_name.clone(),
                    n.size,
                    n.offset,
                    n.claim.clone(),
                    n.block.as_ref().map(|b| b.name.clone()),
                    n.holder_class.clone(),
                    n.force_raw,
                )
            })
            .collect();
        let claims: Vec<_> = st
            .claims
            .iter()
            .map(|(k, c)| (*k, c.namespace.clone(), c.block.is_some()))
            .collect();
        let seeds: Vec<_> = st.regions.iter().map(|r| (r.ns_seed, r.seeds)).collect();
        format!("{ns:?}\n{claims:?}\n{seeds:?}")
    }

    /// Whether an info block of a claim is on the media at this offset.
    pub fn info_block_at(&self, region: u32, offset: u64) -> bool {
        self.st().media.contains_key(&(region, offset))
    }

    /// What `ndctl create-namespace` does, for foreign namespaces in tests:
    /// returns the namespace name.
    pub fn ndctl_create(
        &self,
        region: u32,
        size: u64,
        name: &str,
        kind: Option<ClaimKind>,
    ) -> io::Result<String> {
        let seed = self.read(&format!("{DEVICES}region{region}/namespace_seed"))?;
        let at = |a: &str| format!("{DEVICES}{seed}/{a}");
        self.write(&at("uuid"), &uuid::Uuid::new_v4().to_string())?;
        self.write(&at("alt_name"), name)?;
        self.write(&at("size"), &size.to_string())?;
        match kind {
            None => self.write(&format!("{DRIVER}bind"), &seed)?,
            Some(k) => {
                let c = self.read(&format!("{DEVICES}region{region}/{}", k.seed_attr()))?;
                let cat = |a: &str| format!("{DEVICES}{c}/{a}");
                self.write(&cat("uuid"), &uuid::Uuid::new_v4().to_string())?;
                if k == ClaimKind::Btt {
                    self.write(&cat("sector_size"), "4096")?;
                } else {
                    self.write(&cat("mode"), "pmem")?;
                }
                self.write(&cat("namespace"), &seed)?;
                self.write(&format!("{DRIVER}bind"), &c)?;
            }
        }
        Ok(seed)
    }

    /// A power cycle: idle devices, seeds and drivers are gone; namespaces
    /// come back from their labels (renumbered in offset order) and are
    /// probed: a claim where an info block of theirs is on the media, raw
    /// otherwise. Device nodes and busy marks are forgotten.
    pub fn reboot(&self) {
        let mut st = self.st();
        let old = std::mem::take(&mut st.namespaces);
        st.claims.clear();
        st.busy.clear();
        for r in 0..u32::try_from(st.regions.len()).unwrap_or(0) {
            // The region alignment is not persistent.
            let reg = &mut st.regions[r as usize];
            reg.align = default_align(reg.size, reg.mappings);
            let mut keep: Vec<Ns> = old
                .iter()
                .filter(|((nr, _), n)| *nr == r && n.size > 0)
                .map(|(_, n)| n.clone())
                .collect();
            keep.sort_by_key(|n| n.offset);
            for (i, mut n) in keep.into_iter().enumerate() {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                n.claim = None;
                n.block = None;
                n.force_raw = false;
                n.holder_class.clear();
                let info = st.media.get(&(r, n.offset)).cloned();
                match info.filter(|b| Some(&b.parent_uuid) == n.uuid.as_ref()) {
                    Some(b) => {
                        let k = kind_index(b.kind);
                        let id = st.lowest_free_claim(k, r);
                        let mut c = Claim::idle(b.kind);
                        c.uuid = Some(uuid::Uuid::new_v4().hyphenated().to_string());
                        c.mode = "pmem".into();
                        c.namespace = Some(format!("namespace{r}.{i}"));
                        c.block =
                            Some(st.block(disk_name(r, i, b.kind == ClaimKind::Btt), b.bytes));
                        st.claims.insert((k, r, id), c);
                        n.claim = Some(claim_name(k, r, id));
                    }
                    None => n.block = Some(st.block(disk_name(r, i, false), n.size)),
                }
                st.namespaces.insert((r, i), n);
            }
            if st.namespaces.keys().any(|(nr, _)| *nr == r) || st.regions[r as usize].labeled {
                if st.regions[r as usize].labeled {
                    st.new_ns_seed(r);
                } else {
                    let size = st.regions[r as usize].size;
                    let mut ns = Ns::idle();
                    ns.io = true;
                    ns.size = size;
                    ns.block = Some(st.block(disk_name(r, 0, false), size));
                    st.namespaces.insert((r, 0), ns);
                    st.regions[r as usize].ns_seed = 0;
                }
            }
            for k in 0..3 {
                st.new_claim_seed(k, r);
            }
        }
    }
}

impl Sysfs for Model {
    fn read(&self, path: &str) -> io::Result<String> {
        self.st().read(path)
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        let mut st = self.st();
        st.writes.push((path.to_owned(), value.to_owned()));
        st.write(path, value)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let st = self.st();
        if dir.trim_end_matches('/') == DEVICES.trim_end_matches('/') {
            return Ok(st.all_devices());
        }
        let rest = dir.strip_prefix(DEVICES).ok_or_else(|| err(libc::ENOENT))?;
        let dev = rest
            .strip_suffix("/block")
            .ok_or_else(|| err(libc::ENOENT))?;
        let block = match parse_dev(dev) {
            Some(Dev::Ns(r, i)) => st.namespaces.get(&(r, i)).and_then(|n| n.block.clone()),
            Some(Dev::Claim(k, r, i)) => st.claims.get(&(k, r, i)).and_then(|c| c.block.clone()),
            _ => None,
        };
        block.map(|b| vec![b.name]).ok_or_else(|| err(libc::ENOENT))
    }

    fn link(&self, path: &str) -> io::Result<Option<String>> {
        let st = self.st();
        let Some(dev) = path
            .strip_prefix(DEVICES)
            .and_then(|p| p.strip_suffix("/driver"))
        else {
            return Ok(None);
        };
        Ok(match parse_dev(dev) {
            Some(Dev::Region(r)) if (r as usize) < st.regions.len() => Some("nd_region".into()),
            Some(Dev::Ns(r, i)) => st
                .namespaces
                .get(&(r, i))
                .and_then(|n| n.block.as_ref())
                .map(|_| "nd_pmem".into()),
            Some(Dev::Claim(k, r, i)) => st
                .claims
                .get(&(k, r, i))
                .and_then(|c| c.block.as_ref())
                .map(|_| "nd_pmem".into()),
            _ => None,
        })
    }

    fn exists(&self, path: &str) -> bool {
        self.read(path).is_ok()
            || self.list(path).is_ok()
            || self.link(path).ok().flatten().is_some()
    }

    fn writable(&self) -> io::Result<bool> {
        Ok(!self.st().read_only)
    }

    fn display(&self, path: &str) -> String {
        format!("/sys/{path}")
    }
}

impl BlockDevices for Model {
    fn node(&self, name: &str, major: u32, minor: u32) -> io::Result<PathBuf> {
        let st = self.st();
        match st.blocks().find(|(b, _)| b.name == name) {
            Some((b, _)) if major == BLOCK_MAJOR && b.minor == minor => {
                Ok(PathBuf::from(format!("/dev/{name}")))
            }
            _ => Err(err(libc::ENOENT)),
        }
    }

    fn udev_settled(&self, _major: u32, _minor: u32) -> bool {
        let mut st = self.st();
        if st.udev_lag > 0 {
            st.udev_lag -= 1;
            return false;
        }
        true
    }

    fn is_busy(&self, node: &Path) -> io::Result<bool> {
        let name = node_name(node)?;
        let st = self.st();
        if st.blocks().all(|(b, _)| b.name != name) {
            return Err(err(libc::ENOENT));
        }
        Ok(st.busy.contains(&name))
    }

    fn zero(&self, node: &Path, offset: u64, len: u64, verify: bool) -> io::Result<()> {
        let name = node_name(node)?;
        let mut st = self.st();
        let (bytes, raw_ns) = st
            .blocks()
            .find(|(b, _)| b.name == name)
            .map(|(b, ns)| (b.bytes, ns))
            .ok_or_else(|| err(libc::ENOENT))?;
        if offset + len > bytes {
            return Err(err(libc::ENOSPC));
        }
        if std::mem::take(&mut st.fail_zero) {
            return Err(err(libc::EIO));
        }
        st.zeroed.push((name, offset, len, verify));
        // Zeroing the first 8 KiB of a raw namespace wipes its info block.
        if let Some((r, i)) = raw_ns
            && offset <= 4096
            && offset + len >= 8192
        {
            let off = st.namespaces[&(r, i)].offset;
            st.media.remove(&(r, off));
        }
        Ok(())
    }
}

fn node_name(node: &Path) -> io::Result<String> {
    node.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| err(libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(p: &str) -> String {
        format!("{DEVICES}{p}")
    }

    /// The rig's probe sequence (tests/rig: probe of the direct backend),
    /// replayed against the model: same answers, same seeds.
    #[test]
    fn replays_the_rig_observations() {
        let m = Model::new();
        m.labeled_region(2 << 30);
        m.labeled_region(2 << 30);
        assert_eq!(
            m.read(&dev("region0/namespace_seed")).unwrap(),
            "namespace0.0"
        );
        assert_eq!(
            m.read(&dev("namespace0.0/resource"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        let ns = dev("namespace0.0");
        // size before uuid: ENXIO; misaligned: EINVAL; too big: ENOSPC.
        assert_eq!(
            m.write(&format!("{ns}/size"), "33554432")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        m.write(
            &format!("{ns}/uuid"),
            "2abbb6a3-ad09-4715-9d4e-3513902101cb",
        )
        .unwrap();
        m.write(&format!("{ns}/alt_name"), "t:a").unwrap();
        assert_eq!(
            m.write(&format!("{ns}/size"), &(100 * MIB + 4096).to_string())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(
            m.write(&format!("{ns}/size"), &(4u64 << 30).to_string())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOSPC)
        );
        m.write(&format!("{ns}/size"), "33554432").unwrap();
        assert_eq!(m.read(&format!("{ns}/resource")).unwrap(), "0x100000000");
        assert_eq!(
            m.read(&dev("region0/available_size")).unwrap(),
            "2113929216"
        );
        assert_eq!(m.read(&dev("nmem0/available_slots")).unwrap(), "1018");
        // Size alone does not move the seed.
        assert_eq!(
            m.read(&dev("region0/namespace_seed")).unwrap(),
            "namespace0.0"
        );
        // pfn with mode none: ENXIO, stays attached.
        let p = dev("pfn0.0");
        m.write(&format!("{p}/uuid"), &uuid::Uuid::new_v4().to_string())
            .unwrap();
        m.write(&format!("{p}/align"), "2097152").unwrap();
        m.write(&format!("{p}/namespace"), "namespace0.0").unwrap();
        assert_eq!(
            m.write(&format!("{DRIVER}bind"), "pfn0.0")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        assert_eq!(m.read(&format!("{ns}/holder")).unwrap(), "pfn0.0");
        assert_eq!(
            m.write(&format!("{DRIVER}bind"), "namespace0.0")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        m.write(&format!("{p}/mode"), "pmem").unwrap();
        m.write(&format!("{DRIVER}bind"), "pfn0.0").unwrap();
        assert_eq!(
            m.read(&dev("region0/namespace_seed")).unwrap(),
            "namespace0.1"
        );
        assert_eq!(m.read(&dev("region0/pfn_seed")).unwrap(), "pfn0.1");
        assert_eq!(m.read(&format!("{p}/size")).unwrap(), "31457280");
        assert_eq!(m.list(&format!("{p}/block")).unwrap(), ["pmem0"]);
        assert_eq!(m.read(&format!("{p}/block/pmem0/size")).unwrap(), "61440");
        assert_eq!(m.read(&format!("{ns}/mode")).unwrap(), "memory");
        // Busy while claimed and bound.
        for a in ["uuid", "alt_name", "size", "sector_size", "holder_class"] {
            assert_eq!(
                m.write(&format!("{ns}/{a}"), "4096")
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EBUSY),
                "{a}"
            );
        }
        m.write(&format!("{ns}/force_raw"), "1").unwrap();
        m.write(&format!("{ns}/force_raw"), "0").unwrap();
        assert_eq!(
            m.write(&format!("{p}/namespace"), "")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBUSY)
        );
        // Unbind only: still claimed.
        m.write(&format!("{p}/driver/unbind"), "pfn0.0").unwrap();
        assert_eq!(m.read(&format!("{ns}/holder")).unwrap(), "pfn0.0");
        assert_eq!(
            m.write(&format!("{ns}/size"), "0")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBUSY)
        );
        // Clearing the namespace deletes the non-seed pfn.
        m.write(&format!("{p}/namespace"), "").unwrap();
        assert!(!m.exists(&format!("{p}/uuid")));
        // Raw bind without force_raw: auto-probe, ENXIO.
        assert_eq!(
            m.write(&format!("{DRIVER}bind"), "namespace0.0")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        assert_eq!(m.read(&format!("{ns}/holder")).unwrap(), "pfn0.0");
        assert_eq!(m.read(&format!("{ns}/mode")).unwrap(), "memory");
        assert_eq!(m.read(&dev("region0/pfn_seed")).unwrap(), "pfn0.1");
        // Second and third namespaces, first fit after deleting the middle.
        let mk = |size: u64| {
            let s = m.read(&dev("region0/namespace_seed")).unwrap();
            m.write(
                &dev(&format!("{s}/uuid")),
                &uuid::Uuid::new_v4().to_string(),
            )
            .unwrap();
            m.write(&dev(&format!("{s}/size")), &size.to_string())
                .unwrap();
            m.write(&format!("{DRIVER}bind"), &s).unwrap();
            (s.clone(), m.read(&dev(&format!("{s}/resource"))).unwrap())
        };
        assert_eq!(mk(32 * MIB), ("namespace0.1".into(), "0x102000000".into()));
        assert_eq!(mk(32 * MIB), ("namespace0.2".into(), "0x104000000".into()));
        m.write(&dev("namespace0.1/driver/unbind"), "namespace0.1")
            .unwrap();
        m.write(&dev("namespace0.1/size"), "0").unwrap();
        assert!(!m.exists(&dev("namespace0.1/size")));
        assert_eq!(
            m.read(&dev("region0/max_available_extent")).unwrap(),
            "2046820352"
        );
        assert_eq!(mk(64 * MIB).1, "0x106000000");
        assert_eq!(mk(16 * MIB).1, "0x102000000");
        // Duplicate uuid: EINVAL.
        let u = m.read(&dev("namespace0.2/uuid")).unwrap();
        let s = m.read(&dev("region0/namespace_seed")).unwrap();
        assert_eq!(
            m.write(&dev(&format!("{s}/uuid")), &u)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        // A btt below the minimum fails and stays attached.
        m.write(
            &dev(&format!("{s}/uuid")),
            &uuid::Uuid::new_v4().to_string(),
        )
        .unwrap();
        m.write(&dev(&format!("{s}/size")), &(16 * MIB).to_string())
            .unwrap();
        let b = m.read(&dev("region0/btt_seed")).unwrap();
        m.write(
            &dev(&format!("{b}/uuid")),
            &uuid::Uuid::new_v4().to_string(),
        )
        .unwrap();
        m.write(&dev(&format!("{b}/sector_size")), "4096").unwrap();
        m.write(&dev(&format!("{b}/namespace")), &s).unwrap();
        assert_eq!(
            m.write(&format!("{DRIVER}bind"), &b)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENXIO)
        );
        assert_eq!(m.read(&dev(&format!("{s}/holder"))).unwrap(), b);
    }

    /// Region `align` as `align_store` takes it, and not persistent.
    #[test]
    fn region_align_writes_and_refusals() {
        let m = Model::new();
        m.labeled_region(2 << 30);
        m.labeled_region(8 * MIB);
        let a = dev("region0/align");
        assert_eq!(m.read(&a).unwrap(), "0x1000000");
        // Regions under 16 MiB boot with the page size.
        assert_eq!(m.read(&dev("region1/align")).unwrap(), "0x1000");
        for bad in ["3145728", "2048", "0", "4294967296", "x", "0x"] {
            assert_eq!(
                m.write(&a, bad).unwrap_err().raw_os_error(),
                Some(libc::EINVAL),
                "{bad}"
            );
        }
        assert_eq!(m.read(&a).unwrap(), "0x1000000");
        m.write(&a, "0x200000\n").unwrap();
        assert_eq!(m.read(&a).unwrap(), "0x200000");
        m.write(&a, "2097152").unwrap();
        // Sizes follow it: 2 MiB units now, not 16.
        let ns = dev("namespace0.0");
        m.write(&format!("{ns}/uuid"), &uuid::Uuid::new_v4().to_string())
            .unwrap();
        assert_eq!(
            m.write(&format!("{ns}/size"), &(MIB).to_string())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        m.write(&format!("{ns}/size"), &(6 * MIB).to_string())
            .unwrap();
        m.reboot();
        assert_eq!(m.read(&a).unwrap(), "0x1000000");
        // The 6 MiB namespace came back all the same.
        assert_eq!(m.namespaces()[0].2, 6 * MIB);
    }

    /// nd_pfn_init's layout against layout.rs (which the backend reports
    /// capacity from): the same bytes for every 2 MiB size, and its
    /// refusals.
    #[test]
    fn pfn_layout_is_the_kernels() {
        const BASE: u64 = 4 << 30;
        for units in 2..2048u64 {
            let size = units * 2 * MIB;
            let (off, trunc) = pfn_layout(BASE + 2 * MIB, size, "pmem", 2 * MIB).unwrap();
            assert_eq!(trunc, 0);
            assert_eq!(size - off, layout::fsdax_usable(size), "{size}");
        }
        // Observed in the rig (reference notes): 1 GiB map=dev 1054867456,
        // 512 MiB map=mem 534773760.
        let (off, _) = pfn_layout(BASE, 1 << 30, "pmem", 2 * MIB).unwrap();
        assert_eq!((1 << 30) - off, 1_054_867_456);
        let (off, _) = pfn_layout(BASE, 512 * MIB, "ram", 2 * MIB).unwrap();
        assert_eq!(512 * MIB - off, 534_773_760);
        // 1 GiB pfn align: offset and end in 1 GiB steps.
        let (off, trunc) = pfn_layout(BASE, (1 << 30) + 64 * MIB, "pmem", 1 << 30).unwrap();
        assert_eq!((off, trunc), (1 << 30, 64 * MIB));
        assert_eq!(
            pfn_layout(BASE + 4096, 64 * MIB, "pmem", 2 * MIB),
            Err(libc::EINVAL)
        );
        assert_eq!(pfn_layout(BASE, 2 * MIB, "pmem", 2 * MIB), Err(libc::ENXIO));
        assert_eq!(
            pfn_layout(BASE, 64 * MIB, "none", 2 * MIB),
            Err(libc::ENXIO)
        );
    }

    /// A namespace at a start the pfn rule refuses: the bind fails EINVAL
    /// and the claim stays attached (like any failed bind).
    #[test]
    fn a_misaligned_fsdax_start_is_refused() {
        let m = Model::new();
        m.labeled_region(1 << 30);
        m.write(&dev("region0/align"), "4096").unwrap();
        m.ndctl_create(0, 4096 * 3, "odd", None).unwrap();
        let e = m
            .ndctl_create(0, 64 * MIB, "fs", Some(ClaimKind::Pfn))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let ns = m.namespaces();
        assert_eq!(ns[1].1, 3 * 4096);
        assert_eq!(
            m.read(&dev(&format!("{}/holder", ns[1].0))).unwrap(),
            "pfn0.0"
        );
    }

    #[test]
    fn labelless_and_reboot() {
        let m = Model::new();
        m.labelless_region(1 << 30);
        assert_eq!(m.read(&dev("region0/nstype")).unwrap(), "4");
        assert_eq!(
            m.read(&dev("namespace0.0/devtype")).unwrap(),
            "nd_namespace_io"
        );
        assert_eq!(m.read(&dev("namespace0.0/mode")).unwrap(), "raw");
        assert!(m.read(&dev("namespace0.0/uuid")).is_err());
        assert_eq!(
            m.link(&dev("namespace0.0/driver")).unwrap().as_deref(),
            Some("nd_pmem")
        );
        let m = Model::new();
        m.labeled_region(1 << 30);
        let ns = m
            .ndctl_create(0, 64 * MIB, "fs", Some(ClaimKind::Pfn))
            .unwrap();
        m.ndctl_create(0, 64 * MIB, "raw", None).unwrap();
        m.reboot();
        let after = m.namespaces();
        assert_eq!(after.len(), 2);
        assert_eq!(after[0].0, ns);
        assert_eq!(after[0].4, "memory");
        assert_eq!(after[1].4, "raw");
        assert_eq!(
            m.read(&dev("region0/namespace_seed")).unwrap(),
            "namespace0.2"
        );
    }
}

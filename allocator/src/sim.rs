//! The `sim` backend: regions are sparse files, a volume is an extent of its
//! region file served as a loop device. Without the rights to manage loop
//! devices it runs in file-only mode: volumes are extents of the files, with
//! no block devices (the ledger and controller paths still work).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::backend::{
    Allocated, Backend, Device, DeviceRequest, InventoryItem, Owner, Progress, RegionStamp,
};
use crate::error::{Error, Result};
use crate::loopdev;
use crate::region::RegionSpec;
use crate::units::{Bytes, MIB};

/// Prefix of the loop device name (`lo_file_name`) that marks a device as ours.
pub const MARKER: &str = "pmem-agent:";

/// Bytes an erase punches (and verifies) per step.
const ERASE_CHUNK: u64 = 64 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimMode {
    /// Loop devices (needs CAP_SYS_ADMIN and /dev/loop-control).
    Loop,
    /// Files only, no block devices.
    FileOnly,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub dir: PathBuf,
    pub regions: u32,
    pub region_size: Bytes,
    pub align: Bytes,
    pub ns_slots: u32,
    /// `None` picks loop mode when loop devices can be managed.
    pub mode: Option<SimMode>,
}

impl SimConfig {
    /// The embedded default: 2 regions × 4 GiB, 16 MiB alignment, 509 slots
    /// (what a QEMU NVDIMM with a 128 KiB label area offers).
    pub fn default_in(dir: impl Into<PathBuf>) -> SimConfig {
        SimConfig {
            dir: dir.into(),
            regions: 2,
            region_size: Bytes::gib(4),
            align: Bytes::mib(16),
            ns_slots: 509,
            mode: None,
        }
    }
}

#[derive(Debug)]
pub struct SimBackend {
    mode: SimMode,
    regions: Vec<(RegionSpec, PathBuf)>,
}

impl SimBackend {
    /// Creates (sparse) or checks the region files.
    pub fn open(cfg: &SimConfig) -> Result<SimBackend> {
        if cfg.align.0 == 0 || !cfg.region_size.is_aligned(cfg.align) {
            return Err(Error::InvalidArgument(format!(
                "sim region size {} must be a non-zero multiple of the alignment {}",
                cfg.region_size, cfg.align
            )));
        }
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| Error::io(format!("create sim dir {}", cfg.dir.display()), e))?;
        let dir = cfg
            .dir
            .canonicalize()
            .map_err(|e| Error::io(format!("resolve sim dir {}", cfg.dir.display()), e))?;
        let mut regions = Vec::new();
        for i in 0..cfg.regions {
            let path = dir.join(format!("region{i}.img"));
            // A missing file is made only when the region is stamped (a
            // first start): a region file deleted under volumes the ledger
            // records must not come back empty (identity.rs).
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => {
                    let len = m.len();
                    if len < cfg.region_size.0 {
                        // Configured larger: grow sparsely. Shrinking is refused
                        // (the ledger would reject volumes beyond the end anyway).
                        let f = open_nofollow(&path, false)?;
                        f.set_len(cfg.region_size.0).map_err(|e| {
                            Error::io(format!("size region file {}", path.display()), e)
                        })?;
                    } else if len > cfg.region_size.0 {
                        return Err(Error::InvalidArgument(format!(
                            "region file {} is {} but the configured region size is {}; refusing to shrink it",
                            path.display(),
                            Bytes(len),
                            cfg.region_size
                        )));
                    }
                }
                Ok(_) => {
                    return Err(Error::FailedPrecondition(format!(
                        "region file {} is not a regular file (a symlink?); refusing to use it",
                        path.display()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(format!("stat region file {}", path.display()), e));
                }
            }
            regions.push((
                RegionSpec {
                    id: format!("region{i}"),
                    size: cfg.region_size,
                    align: cfg.align,
                    ns_slots: cfg.ns_slots,
                    numa_node: 0,
                    location: path.display().to_string(),
                },
                path,
            ));
        }
        let mode = cfg.mode.unwrap_or(if loopdev::available() {
            SimMode::Loop
        } else {
            SimMode::FileOnly
        });
        if mode == SimMode::Loop && !loopdev::available() {
            return Err(Error::FailedPrecondition(
                "sim loop mode needs read-write access to /dev/loop-control (run as root or with CAP_SYS_ADMIN)"
                    .into(),
            ));
        }
        Ok(SimBackend { mode, regions })
    }

    pub fn mode(&self) -> SimMode {
        self.mode
    }

    fn region_file(&self, region: &str) -> Result<&Path> {
        self.regions
            .iter()
            .find(|(s, _)| s.id == region)
            .map(|(_, p)| p.as_path())
            .ok_or_else(|| Error::NotFound(format!("sim region {region} does not exist")))
    }

    fn open_region(&self, region: &str) -> Result<(File, &Path)> {
        let path = self.region_file(region)?;
        Ok((open_nofollow(path, false)?, path))
    }

    fn spec(&self, region: &str) -> Result<&RegionSpec> {
        self.regions
            .iter()
            .find(|(s, _)| s.id == region)
            .map(|(s, _)| s)
            .ok_or_else(|| Error::NotFound(format!("sim region {region} does not exist")))
    }

    /// Loop devices over the region file; none when the file is gone.
    fn loops_of(&self, file: &Path) -> Result<Vec<loopdev::LoopDevice>> {
        if self.mode == SimMode::FileOnly || !file.exists() {
            return Ok(Vec::new());
        }
        loopdev::backed_by(file)
            .map_err(|e| Error::io(format!("list loop devices of {}", file.display()), e))
    }

    /// The loop devices over each region file, from one listing of all
    /// loop devices (not one per region).
    fn loops_per_region(&self) -> Result<Vec<(&RegionSpec, Vec<loopdev::LoopDevice>)>> {
        use std::os::unix::fs::MetadataExt;
        if self.mode == SimMode::FileOnly {
            return Ok(Vec::new());
        }
        let mut all = loopdev::list().map_err(|e| Error::io("list loop devices", e))?;
        let mut out = Vec::with_capacity(self.regions.len());
        for (spec, file) in &self.regions {
            let meta = match std::fs::metadata(file) {
                Ok(m) => m,
                // Not made yet (made when stamped): nothing over it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::io(
                        format!("list loop devices of {}", file.display()),
                        e,
                    ));
                }
            };
            let (mine, rest): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|d| d.backing_ino == meta.ino() && d.backing_dev == meta.dev());
            all = rest;
            out.push((spec, mine));
        }
        Ok(out)
    }

    /// Loop devices of ours for this volume (by marker), any offset.
    fn devices_of(&self, req: &DeviceRequest) -> Result<Vec<loopdev::LoopDevice>> {
        let file = self.region_file(&req.region)?;
        let marker = format!("{MARKER}{}", req.volume_id);
        Ok(loopdev::backed_by(file)
            .map_err(|e| Error::io(format!("list loop devices of {}", file.display()), e))?
            .into_iter()
            .filter(|d| d.name == marker || d.offset == req.offset)
            .collect())
    }

    /// Zeroes `[offset, offset+len)` of a region file and verifies it, in
    /// steps of [`ERASE_CHUNK`] reported to `progress`; durable when it
    /// returns.
    fn zero_range(
        &self,
        region: &str,
        offset: Bytes,
        len: Bytes,
        progress: Progress<'_>,
    ) -> Result<()> {
        let (f, path) = self.zero_range_unsynced(region, offset, len, progress)?;
        sync_region(&f, path)
    }

    /// [`SimBackend::zero_range`] without the sync: the zeros are in the
    /// page cache (and read back as zeros), not yet on disk.
    fn zero_range_unsynced(
        &self,
        region: &str,
        offset: Bytes,
        len: Bytes,
        progress: Progress<'_>,
    ) -> Result<(File, &Path)> {
        let (f, path) = self.open_region(region)?;
        let mut done = 0u64;
        while done < len.0 {
            let n = (len.0 - done).min(ERASE_CHUNK);
            zero_chunk(&f, path, Bytes(offset.0 + done), Bytes(n))?;
            done += n;
            progress(n)?;
        }
        Ok((f, path))
    }
}

/// Makes the punched holes and written zeros of a region file durable.
fn sync_region(f: &File, path: &Path) -> Result<()> {
    f.sync_all()
        .map_err(|e| Error::io(format!("sync region file {}", path.display()), e))
}

/// The extended attribute that carries a region file's identity:
/// `ledger=<ledger id> region=<region id>`. An attribute, not a header in
/// the file, so no byte of the region is taken (capacity and every extent
/// stay as they were, also for ledgers from before identities) and the
/// file can grow without moving anything. Filesystems without user
/// extended attributes get a sidecar file instead ([`sidecar`]).
pub const STAMP_XATTR: &str = "user.pmem-agent.identity";

fn open_nofollow(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("open region file {}", path.display()), e))
}

fn xattr_name() -> std::ffi::CString {
    std::ffi::CString::new(STAMP_XATTR).unwrap_or_default()
}

/// The identity attribute of an open file; `None` when it has none.
fn read_stamp(f: &File) -> std::io::Result<Option<String>> {
    let name = xattr_name();
    let mut buf = vec![0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(usize::try_from(n).unwrap_or(0));
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn write_stamp(f: &File, value: &str) -> std::io::Result<()> {
    let name = xattr_name();
    // SAFETY: the value buffer outlives the call and its length is passed.
    let r = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where the attribute cannot be kept (ramfs, tmpfs before Linux 6.6): a
/// file beside the region file, `<region file>.identity`, holding the stamp
/// and the region file's inode, so a deleted and re-created (or replaced)
/// region file does not inherit it.
fn sidecar(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".identity");
    std::path::PathBuf::from(p)
}

fn unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The stamp of a region file: its attribute, or the sidecar where the
/// filesystem has no user attributes. A sidecar written for another inode
/// is reported as such (it is not this file's stamp).
fn read_file_stamp(f: &File, path: &Path) -> std::io::Result<Option<String>> {
    match read_stamp(f) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    let mut side = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(sidecar(path))
    {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut v = String::new();
    std::io::Read::by_ref(&mut side)
        .take(512)
        .read_to_string(&mut v)?;
    let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
    let want = format!("ino={ino}");
    if v.split_whitespace().any(|p| p == want) {
        Ok(Some(v.trim().to_owned()))
    } else {
        Ok(Some(format!(
            "ledger=(a stamp written for another file than inode {ino}) region=?"
        )))
    }
}

fn write_file_stamp(f: &File, path: &Path, value: &str) -> std::io::Result<()> {
    match write_stamp(f, value) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
    let mut side = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(sidecar(path))?;
    std::io::Write::write_all(&mut side, format!("{value} ino={ino}\n").as_bytes())?;
    side.sync_all()
}

fn stamp_value(ledger_id: &str, region: &str) -> String {
    format!("ledger={ledger_id} region={region}")
}

/// The ledger id in a stamp value, with the region it names.
fn parse_stamp(v: &str) -> Option<(&str, &str)> {
    let mut ledger = None;
    let mut region = None;
    for part in v.split_whitespace() {
        if let Some(l) = part.strip_prefix("ledger=") {
            ledger = Some(l);
        } else if let Some(r) = part.strip_prefix("region=") {
            region = Some(r);
        }
    }
    Some((ledger?, region?))
}

/// Punches a hole (or writes zeros where the filesystem cannot) and
/// verifies one range (what a read returns; the caller syncs).
fn zero_chunk(f: &File, path: &Path, offset: Bytes, len: Bytes) -> Result<()> {
    let ctx = |what: &str| {
        format!(
            "{what} {}+{} of region file {}",
            offset.0,
            len.0,
            path.display()
        )
    };
    let (o, l) = (
        i64::try_from(offset.0).map_err(|_| Error::OutOfRange(ctx("offset too large in")))?,
        i64::try_from(len.0).map_err(|_| Error::OutOfRange(ctx("length too large in")))?,
    );
    // SAFETY: plain syscall on an owned fd.
    let punched = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    } == 0;
    if !punched || !range_is_hole(f, offset, len) {
        write_zeros(f, offset, len).map_err(|e| Error::io(ctx("zero"), e))?;
    }
    if !range_is_hole(f, offset, len) {
        verify_zero(f, offset, len).map_err(|e| Error::io(ctx("verify erase of"), e))?;
    }
    Ok(())
}

/// True when no data lies in the range (SEEK_DATA finds none before its end).
fn range_is_hole(f: &File, offset: Bytes, len: Bytes) -> bool {
    let Ok(o) = i64::try_from(offset.0) else {
        return false;
    };
    // SAFETY: plain syscall on an owned fd.
    let next = unsafe { libc::lseek(f.as_raw_fd(), o, libc::SEEK_DATA) };
    if next < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    u64::try_from(next).is_ok_and(|n| n >= offset.0 + len.0)
}

/// I/O chunk for zeroing and verifying.
const CHUNK: usize = 1 << 20;

fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK))
}

fn write_zeros(f: &File, offset: Bytes, len: Bytes) -> std::io::Result<()> {
    let buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len.0 {
        let n = chunk_len(len.0 - done);
        f.write_all_at(&buf[..n], offset.0 + done)?;
        done += n as u64;
    }
    Ok(())
}

fn verify_zero(f: &File, offset: Bytes, len: Bytes) -> std::io::Result<()> {
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(offset.0))?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = len.0;
    while left > 0 {
        let n = chunk_len(left);
        f.read_exact(&mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(std::io::Error::other(format!(
                "non-zero data remains near byte {}",
                offset.0 + (len.0 - left)
            )));
        }
        left -= n as u64;
    }
    f.flush()
}

/// The loop device name of one of our orphans.
fn item_name(item: &InventoryItem) -> String {
    match &item.owner {
        Owner::Ours(id) => format!("{MARKER}{id}"),
        Owner::Foreign(_) => String::new(),
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self
            .regions
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect();
        match self.mode {
            SimMode::Loop => format!(
                "sim backend in loop mode: volumes are loop devices over extents of {}",
                files.join(", ")
            ),
            SimMode::FileOnly => format!(
                "sim backend in file-only mode (no access to /dev/loop-control): volumes are extents of {} without block devices; staging and publishing will fail",
                files.join(", ")
            ),
        }
    }

    fn regions(&self) -> Result<Vec<RegionSpec>> {
        Ok(self.regions.iter().map(|(s, _)| s.clone()).collect())
    }

    fn check_idle(&self, req: &DeviceRequest) -> Result<()> {
        if let Some(Device { path: Some(p), .. }) = self.find(req)?
            && loopdev::is_busy(Path::new(&p))
                .map_err(|e| Error::io(format!("check {p} of volume {}", req.volume_id), e))?
        {
            return Err(Error::FailedPrecondition(format!(
                "device {p} of volume {} is in use (mounted or open exclusively)",
                req.volume_id
            )));
        }
        Ok(())
    }

    fn create(&self, req: &DeviceRequest) -> Result<Device> {
        if self.mode == SimMode::FileOnly {
            self.region_file(&req.region)?;
            return Ok(Device {
                path: None,
                size: req.size,
            });
        }
        if let Some(d) = self.find(req)? {
            if d.size == req.size {
                return Ok(d);
            }
            return self.resize(req);
        }
        let file = self.region_file(&req.region)?;
        let marker = format!("{MARKER}{}", req.volume_id);
        let d = loopdev::attach(file, req.offset, req.size, &marker).map_err(|e| {
            Error::Device(format!(
                "attach loop device for volume {} at {}+{} of {}: {e}",
                req.volume_id,
                req.offset.0,
                req.size.0,
                file.display()
            ))
        })?;
        Ok(Device {
            path: Some(d.path.display().to_string()),
            size: d.size_limit,
        })
    }

    fn find(&self, req: &DeviceRequest) -> Result<Option<Device>> {
        if self.mode == SimMode::FileOnly {
            return Ok(Some(Device {
                path: None,
                size: req.size,
            }));
        }
        found_in(req, self.devices_of(req)?)
    }

    fn find_all(&self, reqs: &[DeviceRequest]) -> Vec<Result<Option<Device>>> {
        // One listing of every loop device, grouped by backing file.
        let listed = match loopdev::list() {
            Ok(l) if self.mode != SimMode::FileOnly => l,
            _ => return reqs.iter().map(|r| self.find(r)).collect(),
        };
        let mut by_file: std::collections::HashMap<(u64, u64), Vec<&loopdev::LoopDevice>> =
            std::collections::HashMap::new();
        for d in &listed {
            by_file
                .entry((d.backing_dev, d.backing_ino))
                .or_default()
                .push(d);
        }
        reqs.iter()
            .map(|req| {
                use std::os::unix::fs::MetadataExt;
                let file = self.region_file(&req.region)?;
                let meta = std::fs::metadata(file).map_err(|e| {
                    Error::io(format!("list loop devices of {}", file.display()), e)
                })?;
                let marker = format!("{MARKER}{}", req.volume_id);
                let devs = by_file
                    .get(&(meta.dev(), meta.ino()))
                    .into_iter()
                    .flatten()
                    .filter(|d| d.name == marker || d.offset == req.offset)
                    .map(|d| (*d).clone())
                    .collect();
                found_in(req, devs)
            })
            .collect()
    }

    fn destroy(&self, req: &DeviceRequest) -> Result<()> {
        if self.mode == SimMode::FileOnly {
            return Ok(());
        }
        let marker = format!("{MARKER}{}", req.volume_id);
        let ours = |d: &loopdev::LoopDevice| d.name == marker;
        for d in self.devices_of(req)?.into_iter().filter(ours) {
            loopdev::detach(&d.path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    Error::FailedPrecondition(format!(
                        "device {} of volume {} is in use (mounted or open exclusively)",
                        d.path.display(),
                        req.volume_id
                    ))
                } else {
                    Error::Device(format!(
                        "detach {} of volume {}: {e}",
                        d.path.display(),
                        req.volume_id
                    ))
                }
            })?;
        }
        // The kernel defers a detach while someone else holds the device
        // open (it only sets autoclear): the tenant could still write behind
        // an erase. Take the detach back so the volume stays as it was, and
        // refuse like a busy device.
        for d in self.devices_of(req)?.into_iter().filter(ours) {
            let kept = loopdev::cancel_autoclear(&d.path, &marker).map_err(|e| {
                Error::Device(format!(
                    "take back the deferred detach of {} (volume {}): {e}",
                    d.path.display(),
                    req.volume_id
                ))
            })?;
            if kept {
                return Err(Error::FailedPrecondition(format!(
                    "device {} of volume {} is in use (open by another process)",
                    d.path.display(),
                    req.volume_id
                )));
            }
        }
        Ok(())
    }

    fn erase(&self, req: &DeviceRequest, progress: Progress<'_>) -> Result<()> {
        // retire (= destroy) verified the loop device is gone: the tenant
        // cannot write behind the erase. Durable with `sync_erased`.
        self.zero_range_unsynced(&req.region, req.offset, req.size, progress)
            .map(|_| ())
    }

    fn sync_erased(&self, erased: &[DeviceRequest]) -> Result<()> {
        let mut regions: Vec<&str> = erased.iter().map(|r| r.region.as_str()).collect();
        regions.sort_unstable();
        regions.dedup();
        for region in regions {
            let (f, path) = self.open_region(region)?;
            sync_region(&f, path)?;
        }
        Ok(())
    }

    fn resize(&self, req: &DeviceRequest) -> Result<Device> {
        if self.mode == SimMode::FileOnly {
            return Ok(Device {
                path: None,
                size: req.size,
            });
        }
        let Some(d) = self.find(req)? else {
            return self.create(req);
        };
        let path = d.path.clone().unwrap_or_default();
        loopdev::set_size(Path::new(&path), req.size).map_err(|e| {
            Error::Device(format!(
                "resize {path} of volume {} to {}: {e}",
                req.volume_id, req.size
            ))
        })?;
        Ok(Device {
            path: Some(path),
            size: req.size,
        })
    }

    fn inventory(&self) -> Result<Vec<InventoryItem>> {
        if self.mode == SimMode::FileOnly {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (spec, loops) in self.loops_per_region()? {
            for d in loops {
                let owner = match d.name.strip_prefix(MARKER) {
                    Some(id) => Owner::Ours(id.to_owned()),
                    None => Owner::Foreign(format!("loop device named {:?}", d.name)),
                };
                out.push(InventoryItem {
                    region: spec.id.clone(),
                    path: d.path.display().to_string(),
                    offset: d.offset,
                    size: d.size_limit,
                    owner,
                });
            }
        }
        Ok(out)
    }

    fn remove_orphan(&self, item: &InventoryItem) -> Result<()> {
        if !matches!(item.owner, Owner::Ours(_)) {
            return Err(Error::FailedPrecondition(format!(
                "refusing to remove foreign device {}",
                item.path
            )));
        }
        loopdev::detach(Path::new(&item.path))
            .map_err(|e| Error::Device(format!("detach orphan {}: {e}", item.path)))?;
        if loopdev::cancel_autoclear(Path::new(&item.path), &item_name(item)).map_err(|e| {
            Error::Device(format!("take back the detach of orphan {}: {e}", item.path))
        })? {
            return Err(Error::FailedPrecondition(format!(
                "orphan {} is in use (open by another process); not removing it",
                item.path
            )));
        }
        // It may hold a tenant's data: the extent is free from now on.
        let spec = self
            .regions
            .iter()
            .find(|(s, _)| s.id == item.region)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| Error::NotFound(format!("sim region {} does not exist", item.region)))?;
        let len = if item.size.0 == 0 {
            Bytes(spec.size.0.saturating_sub(item.offset.0))
        } else {
            Bytes(item.size.0.min(spec.size.0.saturating_sub(item.offset.0)))
        };
        self.zero_range(&item.region, item.offset, len, &mut |_| Ok(()))
    }

    fn reserved(&self) -> Result<Vec<Allocated>> {
        let mut out = Vec::new();
        for (spec, loops) in self.loops_per_region()? {
            for d in loops {
                // A size limit of 0 is "to the end of the file".
                let len = if d.size_limit.0 == 0 {
                    Bytes(spec.size.0.saturating_sub(d.offset.0))
                } else {
                    d.size_limit
                };
                out.push(Allocated {
                    region: spec.id.clone(),
                    offset: d.offset,
                    len,
                    volume: d.name.strip_prefix(MARKER).map(str::to_owned),
                    device: d.path.display().to_string(),
                });
            }
        }
        Ok(out)
    }

    fn region_stamp(&self, region: &str) -> Result<RegionStamp> {
        let path = self.region_file(region)?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => {
                return Ok(RegionStamp::Missing(format!(
                    "its region file {} is not a regular file",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RegionStamp::Missing(format!(
                    "its region file {} is gone",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("stat region file {}", path.display()), e)),
        }
        let f = open_nofollow(path, false)?;
        let v = read_file_stamp(&f, path).map_err(|e| {
            Error::io(
                format!("read identity of region file {}", path.display()),
                e,
            )
        })?;
        Ok(match v.as_deref().map(parse_stamp) {
            None => RegionStamp::Unstamped,
            Some(Some((ledger, r))) if r == region => RegionStamp::Stamped(ledger.to_owned()),
            Some(Some((ledger, r))) => RegionStamp::Stamped(format!("{ledger}, as region {r}")),
            Some(None) => RegionStamp::Stamped(format!("unreadable stamp {v:?}")),
        })
    }

    fn stamp_region(&self, region: &str, ledger_id: &str) -> Result<()> {
        let path = self.region_file(region)?;
        let size = self.spec(region)?.size;
        let f = open_nofollow(path, true)?;
        let len = f
            .metadata()
            .map_err(|e| Error::io(format!("stat region file {}", path.display()), e))?
            .len();
        if len < size.0 {
            f.set_len(size.0)
                .map_err(|e| Error::io(format!("size region file {}", path.display()), e))?;
        }
        write_file_stamp(&f, path, &stamp_value(ledger_id, region))
            .map_err(|e| Error::io(format!("stamp region file {}", path.display()), e))?;
        f.sync_all()
            .map_err(|e| Error::io(format!("sync region file {}", path.display()), e))?;
        if let Some(dir) = path.parent()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn reinit_region(&self, region: &str, ledger_id: &str) -> Result<Vec<String>> {
        let path = self.region_file(region)?.to_owned();
        let spec = self.spec(region)?.clone();
        let mut lines = Vec::new();
        let mut foreign = Vec::new();
        for d in self.loops_of(&path)? {
            if d.name.starts_with(MARKER) {
                loopdev::detach(&d.path).map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "cannot remove {} ({:?}) of region {region}: {e}; unmount it first",
                        d.path.display(),
                        d.name
                    ))
                })?;
                lines.push(format!("removed {} ({})", d.path.display(), d.name));
            } else {
                foreign.push((d.offset, d.size_limit));
            }
        }
        self.stamp_region(region, ledger_id)?;
        // Zero everything but what foreign loop devices cover.
        let mut at = Bytes::ZERO;
        foreign.sort();
        for (o, l) in foreign {
            if o > at {
                self.zero_range(region, at, o - at, &mut |_| Ok(()))?;
            }
            let end = if l.0 == 0 { spec.size } else { o + l };
            at = at.max(end);
        }
        if at < spec.size {
            self.zero_range(region, at, spec.size - at, &mut |_| Ok(()))?;
        }
        lines.push(format!(
            "zeroed region file {} and stamped it for ledger {ledger_id}",
            path.display()
        ));
        Ok(lines)
    }

    fn scrub_free(&self, region: &str, free: &[(Bytes, Bytes)]) -> Result<()> {
        for (o, l) in free {
            self.zero_range(region, *o, *l, &mut |_| Ok(()))?;
        }
        Ok(())
    }
}

/// The device of `req` among `devs` (the loop devices over its region file
/// named for it or at its offset): another's device at its extent is an
/// error, never taken for ours.
fn found_in(req: &DeviceRequest, devs: Vec<loopdev::LoopDevice>) -> Result<Option<Device>> {
    let marker = format!("{MARKER}{}", req.volume_id);
    if let Some(other) = devs.iter().find(|d| d.name != marker) {
        return Err(Error::Device(format!(
            "extent {}+{} of region {} for volume {} is attached to {} named {:?}, which is not ours",
            req.offset.0,
            req.size.0,
            req.region,
            req.volume_id,
            other.path.display(),
            other.name
        )));
    }
    Ok(devs
        .into_iter()
        .find(|d| d.offset == req.offset)
        .map(|d| Device {
            path: Some(d.path.display().to_string()),
            size: d.size_limit,
        }))
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    /// Root (CI runs as root): on ramfs, which keeps no user extended
    /// attributes, the stamp lives in the sidecar, and a re-created region
    /// file does not inherit it.
    #[test]
    fn without_xattrs_the_stamp_is_a_sidecar_bound_to_the_inode() {
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path().join("ramfs");
        std::fs::create_dir(&mnt).unwrap();
        nix::mount::mount(
            Some("ramfs"),
            &mnt,
            Some("ramfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount ramfs (the test needs root)");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _u = Unmount(&mnt);
        let path = mnt.join("region0.img");
        let f = open_nofollow(&path, true).unwrap();
        let e = write_stamp(&f, "x").unwrap_err();
        assert!(unsupported(&e), "ramfs took a user xattr: {e}");
        let value = stamp_value("abc", "region0");
        write_file_stamp(&f, &path, &value).unwrap();
        let got = read_file_stamp(&f, &path).unwrap().unwrap();
        assert_eq!(parse_stamp(&got), Some(("abc", "region0")), "{got}");
        // The file replaced: the sidecar is not its stamp.
        drop(f);
        let keep = open_nofollow(&mnt.join("keep-inode-busy"), true).unwrap();
        std::fs::remove_file(&path).unwrap();
        let f = open_nofollow(&path, true).unwrap();
        let got = read_file_stamp(&f, &path).unwrap().unwrap();
        assert_ne!(parse_stamp(&got).map(|p| p.0), Some("abc"), "{got}");
        drop(keep);
        // No sidecar at all: unstamped.
        std::fs::remove_file(sidecar(&path)).unwrap();
        assert_eq!(read_file_stamp(&f, &path).unwrap(), None);
    }
}

#[cfg(test)]
mod find_tests {
    use super::*;
    use crate::volume::Usage;

    /// Root (CI runs as root): the batched lookup reconciliation uses gives
    /// exactly `find`'s answers — found, missing, and another's device at
    /// the extent refused — from one listing of the loop devices.
    #[test]
    fn find_all_answers_as_find_does() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = SimConfig::default_in(d.path());
        cfg.region_size = Bytes::gib(1);
        cfg.mode = Some(SimMode::Loop);
        let b = SimBackend::open(&cfg).unwrap();
        for r in ["region0", "region1"] {
            b.stamp_region(r, "0123456789abcdef0123456789abcdef")
                .unwrap();
        }
        let req = |id: &str, region: &str, unit: u64| DeviceRequest {
            volume_id: id.into(),
            region: region.into(),
            offset: Bytes::mib(16 * unit),
            size: Bytes::mib(16),
            usage: Usage::AppDirect,
        };
        let reqs = [
            req("pmem-a", "region0", 0),
            req("pmem-b", "region0", 1),
            req("pmem-c", "region1", 0),
            req("pmem-d", "region1", 2),
            req("pmem-e", "region1", 3),
        ];
        struct Undo<'a>(&'a SimBackend, Vec<DeviceRequest>, Vec<PathBuf>);
        impl Drop for Undo<'_> {
            fn drop(&mut self) {
                for r in &self.1 {
                    let _ = self.0.destroy(r);
                }
                for p in &self.2 {
                    let _ = loopdev::detach(p);
                }
            }
        }
        let mut undo = Undo(&b, reqs[..3].to_vec(), Vec::new());
        for r in &reqs[..3] {
            b.create(r).unwrap();
        }
        // Someone else's loop device over pmem-d's extent.
        let other = loopdev::attach(
            b.region_file("region1").unwrap(),
            Bytes::mib(32),
            Bytes::mib(16),
            "someone-else",
        )
        .unwrap();
        undo.2.push(other.path.clone());
        let each: Vec<_> = reqs.iter().map(|r| b.find(r)).collect();
        let all = b.find_all(&reqs);
        assert_eq!(all.len(), reqs.len());
        for (i, (e, a)) in each.iter().zip(&all).enumerate() {
            match (e, a) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{}", reqs[i].volume_id),
                (Err(x), Err(y)) => assert_eq!(x.to_string(), y.to_string()),
                _ => panic!("{}: find {e:?} but find_all {a:?}", reqs[i].volume_id),
            }
        }
        assert!(all[..3].iter().all(|f| matches!(f, Ok(Some(_)))), "{all:?}");
        assert!(all[3].is_err(), "{:?}", all[3]);
        assert!(matches!(all[4], Ok(None)), "{:?}", all[4]);
    }
}

//! Loop devices through the kernel's ioctl interface (no `losetup`): attach a
//! byte range of a file, find what is attached, resize and detach.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::units::Bytes;

const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_MAJOR: u64 = 7;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

/// An attached loop device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub path: PathBuf,
    pub index: u32,
    /// `st_dev` and `st_ino` of the backing file.
    pub backing_dev: u64,
    pub backing_ino: u64,
    pub offset: Bytes,
    /// 0 means "to the end of the file".
    pub size_limit: Bytes,
    /// The name the attacher stored (`lo_file_name`); we store our marker there.
    pub name: String,
}

fn ioctl_ptr<T>(fd: &File, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` points to a live, correctly laid out struct for `req`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ioctl_val(fd: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the request takes an integer argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `/dev/loopN`, created with mknod when the node is missing (containers
/// without udev).
pub fn node_path(index: u32) -> io::Result<PathBuf> {
    let path = PathBuf::from(format!("/dev/loop{index}"));
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_block_device() => Ok(path),
        Ok(_) => Err(io::Error::other(format!(
            "{} exists but is not a block device",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dev = nix::sys::stat::makedev(LOOP_MAJOR, u64::from(index));
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                dev,
            )
            .map_err(io::Error::from)?;
            Ok(path)
        }
        Err(e) => Err(e),
    }
}

/// Whether this process can manage loop devices.
pub fn available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .is_ok()
}

/// Attaches `[offset, offset+size)` of `file` to a free loop device, with
/// `name` stored as its file name. Retries when another attacher takes the
/// same free device first.
pub fn attach(file: &Path, offset: Bytes, size: Bytes, name: &str) -> io::Result<LoopDevice> {
    let backing = OpenOptions::new().read(true).write(true).open(file)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut info = zeroed_info();
    info.lo_offset = offset.0;
    info.lo_sizelimit = size.0;
    let bytes = name.as_bytes();
    let n = bytes.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&bytes[..n]);
    let mut last = io::Error::other("no attempt");
    for _ in 0..64 {
        let index = ioctl_val(&ctl, LOOP_CTL_GET_FREE, 0)?;
        let index = u32::try_from(index).map_err(io::Error::other)?;
        let path = node_path(index)?;
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut cfg = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).map_err(io::Error::other)?,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        match ioctl_ptr(&dev, LOOP_CONFIGURE, &mut cfg) {
            Ok(_) => return status(&path, index),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn status(path: &Path, index: u32) -> io::Result<LoopDevice> {
    let dev = File::open(path)?;
    let mut info = zeroed_info();
    ioctl_ptr(&dev, LOOP_GET_STATUS64, &mut info)?;
    let name = CStr::from_bytes_until_nul(&info.lo_file_name)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(LoopDevice {
        path: path.to_owned(),
        index,
        backing_dev: info.lo_device,
        backing_ino: info.lo_inode,
        offset: Bytes(info.lo_offset),
        size_limit: Bytes(info.lo_sizelimit),
        name,
    })
}

/// Every bound loop device (those with `/sys/block/loopN/loop`).
pub fn list() -> io::Result<Vec<LoopDevice>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let entry = entry?;
        let fname = entry.file_name();
        let Some(index) = fname
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !entry.path().join("loop").exists() {
            continue;
        }
        match node_path(index).and_then(|p| status(&p, index)) {
            Ok(d) => out.push(d),
            // Detached between the readdir and the ioctl.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|d| d.index);
    Ok(out)
}

/// Loop devices whose backing file is `file` (same device and inode).
pub fn backed_by(file: &Path) -> io::Result<Vec<LoopDevice>> {
    let meta = std::fs::metadata(file)?;
    Ok(list()?
        .into_iter()
        .filter(|d| d.backing_ino == meta.ino() && d.backing_dev == meta.dev())
        .collect())
}

/// Detaches a loop device. Refuses with `EBUSY` while it is mounted or opened
/// exclusively by someone else.
pub fn detach(path: &Path) -> io::Result<()> {
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)?;
    match ioctl_val(&dev, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        // Already detached.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `LO_FLAGS_AUTOCLEAR` from `<linux/loop.h>`.
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Takes back a detach the kernel deferred because someone else still has
/// the device open (LOOP_CLR_FD then only sets autoclear): clears the flag
/// if the device still carries `name`. `Ok(false)`: the device is gone.
pub fn cancel_autoclear(path: &Path, name: &str) -> io::Result<bool> {
    let dev = match OpenOptions::new().read(true).open(path) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut info = zeroed_info();
    match ioctl_ptr(&dev, LOOP_GET_STATUS64, &mut info) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(false),
        Err(e) => return Err(e),
    }
    let got = CStr::from_bytes_until_nul(&info.lo_file_name)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    if got != name {
        return Ok(false);
    }
    info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
    ioctl_ptr(&dev, LOOP_SET_STATUS64, &mut info)?;
    Ok(true)
}

/// Whether the device is in use (mounted, or held open exclusively).
pub fn is_busy(path: &Path) -> io::Result<bool> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Changes the size limit of an attached device and tells the block layer.
pub fn set_size(path: &Path, size: Bytes) -> io::Result<()> {
    let dev = OpenOptions::new().read(true).write(true).open(path)?;
    let mut info = zeroed_info();
    ioctl_ptr(&dev, LOOP_GET_STATUS64, &mut info)?;
    info.lo_sizelimit = size.0;
    ioctl_ptr(&dev, LOOP_SET_STATUS64, &mut info)?;
    ioctl_val(&dev, LOOP_SET_CAPACITY, 0)?;
    Ok(())
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub fn block_size_bytes(path: &Path) -> io::Result<Bytes> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let dev = File::open(path)?;
    let mut size: u64 = 0;
    ioctl_ptr(&dev, BLKGETSIZE64, &mut size)?;
    Ok(Bytes(size))
}

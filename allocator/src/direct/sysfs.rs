//! The direct backend's only ways to touch the system: sysfs attributes
//! ([`Sysfs`]) and block device nodes ([`BlockDevices`]). The real
//! implementations are thin; the in-memory model (`model.rs`) implements the
//! same traits so the backend's logic is tested without a kernel.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Attribute access relative to a sysfs root, e.g. `bus/nd/devices/region0/size`.
pub trait Sysfs: Send + Sync + Debug {
    /// The attribute's value without its trailing newline.
    fn read(&self, path: &str) -> io::Result<String>;
    /// Writes `value` plus a newline (as `echo` does) in one write(2).
    fn write(&self, path: &str, value: &str) -> io::Result<()>;
    /// Entry names of a directory, sorted.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// The last component of a symlink's target (`driver` -> `nd_pmem`);
    /// `None` when the link does not exist.
    fn link(&self, path: &str) -> io::Result<Option<String>>;
    fn exists(&self, path: &str) -> bool;
    /// False when the tree is mounted read-only.
    fn writable(&self) -> io::Result<bool>;
    /// The full path, for messages.
    fn display(&self, path: &str) -> String;
}

/// Block device nodes of namespaces and their claim devices.
pub trait BlockDevices: Send + Sync + Debug {
    /// The node of block device `name` (`major:minor`), created when neither
    /// devtmpfs nor udev made it (containers with a private /dev).
    fn node(&self, name: &str, major: u32, minor: u32) -> io::Result<PathBuf>;
    /// True once udevd, where it runs, has processed the device (its rules
    /// ran: permissions, /dev/disk links, probes done). Without udevd: true.
    fn udev_settled(&self, _major: u32, _minor: u32) -> bool {
        true
    }
    /// True when the device is mounted or open exclusively (O_EXCL gives EBUSY).
    fn is_busy(&self, node: &Path) -> io::Result<bool>;
    /// Writes zeros over `[offset, offset + len)` and syncs; with `verify`,
    /// drops the cached pages and reads the range back from the device.
    fn zero(&self, node: &Path, offset: u64, len: u64, verify: bool) -> io::Result<()>;
}

/// sysfs itself, under `root` (normally `/sys`).
#[derive(Debug, Clone)]
pub struct RealSysfs {
    root: PathBuf,
}

impl RealSysfs {
    pub fn new(root: impl Into<PathBuf>) -> RealSysfs {
        RealSysfs { root: root.into() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }
}

impl Sysfs for RealSysfs {
    fn read(&self, path: &str) -> io::Result<String> {
        let mut s = std::fs::read_to_string(self.path(path))?;
        while s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        // No O_CREAT or O_TRUNC: attributes exist or the write is wrong.
        let mut f = OpenOptions::new().write(true).open(self.path(path))?;
        f.write_all(format!("{value}\n").as_bytes())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(self.path(dir))? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn link(&self, path: &str) -> io::Result<Option<String>> {
        match std::fs::read_link(self.path(path)) {
            Ok(t) => Ok(t.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn exists(&self, path: &str) -> bool {
        self.path(path).exists()
    }

    fn writable(&self) -> io::Result<bool> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(io::Error::from)?;
        Ok(!st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
    }

    fn display(&self, path: &str) -> String {
        self.path(path).display().to_string()
    }
}

/// Device nodes under `dir` (normally `/dev`).
#[derive(Debug, Clone)]
pub struct RealBlockDevices {
    dir: PathBuf,
    /// udevd's database (`/run/udev/data`) when udevd runs.
    udev_data: Option<PathBuf>,
}

impl RealBlockDevices {
    /// Nodes under `dir`; udevd is waited for when `/run/udev/control` exists.
    pub fn new(dir: impl Into<PathBuf>) -> RealBlockDevices {
        let udev = Path::new("/run/udev/control")
            .exists()
            .then(|| PathBuf::from("/run/udev/data"));
        RealBlockDevices::with_udev(dir, udev)
    }

    pub fn with_udev(dir: impl Into<PathBuf>, udev_data: Option<PathBuf>) -> RealBlockDevices {
        RealBlockDevices {
            dir: dir.into(),
            udev_data,
        }
    }
}

/// Zeroing and verification chunk.
const CHUNK: usize = 1 << 20;

impl BlockDevices for RealBlockDevices {
    fn udev_settled(&self, major: u32, minor: u32) -> bool {
        // udevd writes a block device's database entry when its rules ran.
        self.udev_data
            .as_ref()
            .is_none_or(|d| d.join(format!("b{major}:{minor}")).exists())
    }

    fn node(&self, name: &str, major: u32, minor: u32) -> io::Result<PathBuf> {
        let path = self.dir.join(name);
        let want = nix::sys::stat::makedev(major.into(), minor.into());
        for _ in 0..2 {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_block_device() && m.rdev() == want => return Ok(path),
                Ok(m) if m.file_type().is_block_device() => {
                    // A stale node of an earlier device (a /dev without devtmpfs).
                    tracing::warn!(node = %path.display(), "replacing stale device node with {major}:{minor}");
                    std::fs::remove_file(&path)?;
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a block device", path.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                want,
            ) {
                Ok(()) => return Ok(path),
                // devtmpfs or udev won the race: check what they made.
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::other(format!(
            "{} keeps changing while it is created",
            path.display()
        )))
    }

    fn is_busy(&self, node: &Path) -> io::Result<bool> {
        crate::loopdev::is_busy(node)
    }

    fn zero(&self, node: &Path, offset: u64, len: u64, verify: bool) -> io::Result<()> {
        let f = OpenOptions::new().read(true).write(true).open(node)?;
        let buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = chunk(len - done);
            f.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        f.sync_all()?;
        if verify {
            drop_cache(&f, offset, len)?;
            verify_zero(&f, offset, len)?;
        }
        Ok(())
    }
}

fn chunk(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK))
}

/// Drops clean cached pages so the verification reads the media.
fn drop_cache(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::other("range too large"));
    };
    // SAFETY: plain syscall on an owned fd.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), o, l, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn verify_zero(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = chunk(len - done);
        f.read_exact_at(&mut buf[..n], offset + done)?;
        // Slice equality is a memcmp; find the byte only to report it.
        if buf[..n] != zeros[..n]
            && let Some(i) = buf[..n].iter().position(|&b| b != 0)
        {
            return Err(io::Error::other(format!(
                "non-zero byte at {} after zeroing",
                offset + done + i as u64
            )));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_sysfs_reads_writes_lists_and_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("bus/nd/devices/region0");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("size"), "4096\n").unwrap();
        std::fs::write(d.join("align"), "").unwrap();
        std::os::unix::fs::symlink("../../drivers/nd_region", d.join("driver")).unwrap();
        let s = RealSysfs::new(dir.path());
        assert_eq!(s.read("bus/nd/devices/region0/size").unwrap(), "4096");
        s.write("bus/nd/devices/region0/align", "0x1000000")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("align")).unwrap(),
            "0x1000000\n"
        );
        // Attributes are never created.
        assert!(s.write("bus/nd/devices/region0/nope", "1").is_err());
        assert_eq!(
            s.list("bus/nd/devices/region0").unwrap(),
            ["align", "driver", "size"]
        );
        assert_eq!(
            s.link("bus/nd/devices/region0/driver").unwrap().as_deref(),
            Some("nd_region")
        );
        assert_eq!(s.link("bus/nd/devices/region0/gone").unwrap(), None);
        assert!(s.exists("bus/nd/devices"));
        assert!(s.writable().unwrap());
        assert!(s.display("bus").ends_with("/bus"));
    }

    #[test]
    fn udev_settled_reads_the_udev_database() {
        let dir = tempfile::tempdir().unwrap();
        let d = RealBlockDevices::with_udev(dir.path(), Some(dir.path().join("data")));
        assert!(!d.udev_settled(259, 3));
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/b259:3"), "").unwrap();
        assert!(d.udev_settled(259, 3));
        assert!(RealBlockDevices::with_udev(dir.path(), None).udev_settled(1, 1));
    }

    #[test]
    fn zeroing_writes_syncs_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        std::fs::write(&p, vec![0xa5u8; 3 << 20]).unwrap();
        let d = RealBlockDevices::new(dir.path());
        d.zero(&p, 4096, (2 << 20) + 4096, true).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0xa5));
        assert!(data[4096..(2 << 20) + 8192].iter().all(|&b| b == 0));
        assert!(data[(2 << 20) + 8192..].iter().all(|&b| b == 0xa5));
        let f = File::open(&p).unwrap();
        let e = verify_zero(&f, 0, 8192).unwrap_err();
        assert!(e.to_string().contains("non-zero byte at 0"), "{e}");
        // Not a block device: node() refuses to replace it.
        let e = d.node("dev", 259, 0).unwrap_err();
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}

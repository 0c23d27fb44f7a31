//! The real host: mount syscalls, `/proc/self/mountinfo`, sysfs, and the
//! filesystem tools run with deadlines. Syscalls run on the blocking pool.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::unistd::UnlinkatFlags;

use super::confine::{Stat, fd_path, quote, statx_fd, step};
use super::exec::{self, run, run_ok};
use super::{
    BindSource, Confined, FsStats, FsType, Host, Leaf, MountEntry, MountError, MountSpec,
    PathState, Probe, Removed, Unmounted, mountinfo,
};

const BLKID_DEADLINE: Duration = Duration::from_secs(30);
const MKFS_DEADLINE: Duration = Duration::from_secs(600);
const TOOL_DEADLINE: Duration = Duration::from_secs(60);
const GROW_DEADLINE: Duration = Duration::from_secs(600);

/// Below this, mkfs.xfs with a 2 MiB stripe unit cannot fit its 64 MiB log
/// in one of the default four allocation groups; two groups make room.
const XFS_SMALL_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Default)]
pub struct RealHost;

impl RealHost {
    pub fn new() -> RealHost {
        RealHost
    }
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, MountError> + Send + 'static,
) -> Result<T, MountError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MountError::Parse(format!("{what} task failed: {e}")))?
}

fn path_str(p: &Path) -> Result<&str, MountError> {
    p.to_str()
        .ok_or_else(|| MountError::Parse(format!("path {} is not UTF-8", p.display())))
}

/// Parses `blkid -p -o export` output (exit status 0).
pub fn parse_blkid(out: &str) -> Probe {
    let mut ty = None;
    let mut usage = None;
    let mut pt = None;
    for line in out.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => ty = Some(v.to_owned()),
            Some(("USAGE", v)) => usage = Some(v.to_owned()),
            Some(("PTTYPE", v)) => pt = Some(v.to_owned()),
            _ => {}
        }
    }
    match (ty, usage, pt) {
        (Some(t), None, _) => Probe::Filesystem(t),
        (Some(t), Some(u), _) if u == "filesystem" => Probe::Filesystem(t),
        (Some(t), Some(u), _) => Probe::Other(format!("a {u} signature ({t})")),
        (None, _, Some(p)) => Probe::Other(format!("a {p} partition table")),
        (None, _, None) => Probe::Other("a signature blkid could not name".to_owned()),
    }
}

/// Block count × block size from `dumpe2fs -h` output.
pub fn parse_dumpe2fs(out: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    field("Block count:")?.checked_mul(field("Block size:")?)
}

/// The mkfs argv for a device of `size` bytes.
pub fn mkfs_argv(fs: FsType, dev: &str, size: u64) -> Vec<String> {
    let v: Vec<&str> = match fs {
        FsType::Xfs => {
            let data = if size < XFS_SMALL_BYTES {
                "su=2m,sw=1,agcount=2"
            } else {
                "su=2m,sw=1"
            };
            vec![
                "mkfs.xfs",
                "-q",
                "-b",
                "size=4096",
                "-m",
                "reflink=0",
                "-d",
                data,
                dev,
            ]
        }
        FsType::Ext4 => vec![
            "mkfs.ext4",
            "-q",
            "-b",
            "4096",
            "-E",
            "stride=512,stripe_width=512",
            dev,
        ],
    };
    v.into_iter().map(str::to_owned).collect()
}

fn sysfs_dax(rdev: u64) -> bool {
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let base = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    // A partition has no queue of its own; its disk's applies.
    [base.join("queue/dax"), base.join("../queue/dax")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .is_some_and(|v| v.trim() == "1")
}

#[tonic::async_trait]
impl Host for RealHost {
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        blocking("mountinfo", mount_table).await
    }

    async fn inspect(&self, path: &Confined) -> Result<Option<PathState>, MountError> {
        let path = path.clone();
        blocking("inspect", move || inspect(&path)).await
    }

    async fn mount(&self, spec: &MountSpec) -> Result<MountEntry, MountError> {
        let spec = spec.clone();
        blocking("mount", move || {
            let data = spec.data.join(",");
            let device = spec.device;
            let (dir, name, u, ours) = attach(
                &spec.target,
                libc::S_IFDIR,
                |leaf| {
                    nix::mount::mount(
                        Some(&spec.source),
                        &fd_path(leaf),
                        Some(spec.fs_type.as_str()),
                        spec.flags,
                        (!data.is_empty()).then_some(data.as_str()),
                    )
                    .map_err(|e| {
                        MountError::sys(
                            format!(
                                "mount {} on {} (type {}, flags {:?}, options {})",
                                spec.source.display(),
                                quote(&spec.target.real().to_string_lossy()),
                                spec.fs_type,
                                spec.flags,
                                quote(&data)
                            ),
                            e,
                        )
                    })
                },
                |st| st.dev == device,
            )?;
            let undo = |e: MountError| -> MountError {
                undo_new(dir.as_fd(), &name, &u.before, &|st| st.dev == device);
                e
            };
            let e = entry(ours.mnt_id)
                .map_err(undo)?
                .ok_or_else(|| {
                    MountError::Parse(format!(
                        "the new mount {} is not in /proc/self/mountinfo",
                        ours.mnt_id
                    ))
                })
                .map_err(undo)?;
            if spec.dax_required && !e.dax() {
                return Err(undo(MountError::NoDax(e.super_options.join(","))));
            }
            if spec.extent_hint && e.fs_type == "xfs" && !e.read_only() {
                extent_hint_below(dir.as_fd(), &name, &spec.target).map_err(undo)?;
            }
            Ok(e)
        })
        .await
    }

    async fn bind(
        &self,
        source: &BindSource,
        target: &Confined,
        device: u64,
        flags: MsFlags,
    ) -> Result<(), MountError> {
        let (source, target) = (source.clone(), target.clone());
        blocking("bind mount", move || {
            let (src, want, shown) = open_source(&source, device)?;
            let check = |st: &Stat| match source {
                BindSource::Device(_) => st.kind() == libc::S_IFBLK && st.rdev == device,
                BindSource::Staging(_) => st.dev == device,
            };
            let (dir, name, u, _) = attach(
                &target,
                want,
                |leaf| {
                    nix::mount::mount(
                        Some(&fd_path(src.as_fd())),
                        &fd_path(leaf),
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| {
                        MountError::sys(
                            format!("bind mount {shown} on {}", target.real().display()),
                            e,
                        )
                    })
                },
                check,
            )?;
            if flags.is_empty() {
                return Ok(());
            }
            let at = below(dir.as_fd(), &name);
            let remount = nix::mount::mount(
                None::<&str>,
                &at,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                None::<&str>,
            );
            if let Err(e) = remount {
                // Do not leave a mount without the asked-for protection.
                undo_new(dir.as_fd(), &name, &u.before, &check);
                return Err(MountError::sys(
                    format!("remount bind {} with {flags:?}", target.real().display()),
                    e,
                ));
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Confined, device: u64) -> Result<Unmounted, MountError> {
        let target = target.clone();
        blocking("unmount", move || unmount(&target, device)).await
    }

    async fn device_number(&self, path: &Path) -> Result<Option<u64>, MountError> {
        let path = path.to_owned();
        blocking("stat", move || match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() => {
                Ok(Some(std::os::unix::fs::MetadataExt::rdev(&m)))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MountError::io(format!("stat {}", path.display()), e)),
        })
        .await
    }

    async fn device_size(&self, dev: &Path) -> Result<u64, MountError> {
        let dev = dev.to_owned();
        blocking("device size", move || {
            pmem_allocator::loopdev::block_size_bytes(&dev)
                .map(|b| b.0)
                .map_err(|e| MountError::io(format!("size of {}", dev.display()), e))
        })
        .await
    }

    async fn dax_supported(&self, dev: &Path) -> bool {
        match self.device_number(dev).await {
            Ok(Some(rdev)) => blocking("sysfs", move || Ok(sysfs_dax(rdev)))
                .await
                .unwrap_or(false),
            _ => false,
        }
    }

    async fn probe(&self, dev: &Path) -> Result<Probe, MountError> {
        let d = path_str(dev)?;
        let argv = ["blkid", "-p", "-o", "export", d];
        let out = run(&argv, BLKID_DEADLINE).await?;
        match out.code {
            Some(0) => Ok(parse_blkid(&out.stdout)),
            // Nothing detected.
            Some(2) => Ok(Probe::Empty),
            _ => Err(exec::failed(&argv, &out)),
        }
    }

    async fn mkfs(&self, dev: &Path, fs: FsType) -> Result<(), MountError> {
        let size = self.device_size(dev).await?;
        let argv = mkfs_argv(fs, path_str(dev)?, size);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_ok(&argv, MKFS_DEADLINE).await.map(|_| ())
    }

    async fn set_extent_hint(&self, dir: &Confined) -> Result<(), MountError> {
        let dir = dir.clone();
        blocking("extent size hint", move || set_extent_hint(&dir)).await
    }

    async fn statvfs(&self, path: &Confined, device: u64) -> Result<FsStats, MountError> {
        let path = path.clone();
        blocking("statvfs", move || {
            let (fd, _) = open_mount_root(&path, device)?;
            let s = nix::sys::statvfs::fstatvfs(&fd)
                .map_err(|e| MountError::sys(format!("fstatvfs {}", path.real().display()), e))?;
            Ok(FsStats {
                block_size: s.fragment_size(),
                blocks: s.blocks(),
                blocks_free: s.blocks_free(),
                blocks_avail: s.blocks_available(),
                files: s.files(),
                files_free: s.files_free(),
            })
        })
        .await
    }

    async fn ext4_size(&self, dev: &Path) -> Result<u64, MountError> {
        let argv = ["dumpe2fs", "-h", path_str(dev)?];
        let out = run_ok(&argv, TOOL_DEADLINE).await?;
        parse_dumpe2fs(&out.stdout).ok_or_else(|| {
            MountError::Parse(format!(
                "{}: no block count and size in its output",
                exec::render(&argv)
            ))
        })
    }

    async fn grow_online(
        &self,
        fs: FsType,
        path: &Confined,
        device: u64,
        size: u64,
    ) -> Result<(), MountError> {
        let path = path.clone();
        blocking("grow", move || {
            let (fd, e) = open_mount_root(&path, device)?;
            if e.fs_type != fs.as_str() {
                return Err(MountError::Refused(format!(
                    "{} {} is a {} filesystem, not {}",
                    path.field(),
                    quote(&path.lexical().to_string_lossy()),
                    e.fs_type,
                    fs.as_str()
                )));
            }
            match fs {
                FsType::Xfs => grow_xfs(fd.as_fd(), &path, size),
                FsType::Ext4 => grow_ext4(fd.as_fd(), &path, size),
            }
        })
        .await
    }

    async fn grow_offline_ext4(&self, dev: &Path) -> Result<(), MountError> {
        let d = path_str(dev)?;
        let fsck = ["e2fsck", "-f", "-y", d];
        let out = run(&fsck, GROW_DEADLINE).await?;
        // 0: clean, 1: errors corrected; anything else needs a human.
        if !matches!(out.code, Some(0 | 1)) {
            return Err(exec::failed(&fsck, &out));
        }
        run_ok(&["resize2fs", d], GROW_DEADLINE).await.map(|_| ())
    }

    async fn make_dir(&self, path: &Confined) -> Result<(), MountError> {
        let path = path.clone();
        blocking("mkdir", move || path.make_dir().map(drop)).await
    }

    async fn make_file(&self, path: &Confined) -> Result<(), MountError> {
        let path = path.clone();
        blocking("create file", move || path.make_file().map(drop)).await
    }

    async fn remove(&self, path: &Confined, leaf: Leaf) -> Result<Removed, MountError> {
        let path = path.clone();
        blocking("remove", move || remove(&path, leaf)).await
    }
}

/// A readable fd of the root of the mount at `path`, opened beneath the
/// kubelet root without following symlinks, and that mount's entry; the
/// mount must be a filesystem on `device`. Calls through the fd act on
/// that filesystem whatever happens to the path afterwards.
fn open_mount_root(path: &Confined, device: u64) -> Result<(OwnedFd, MountEntry), MountError> {
    let not = || {
        MountError::Refused(format!(
            "{} {} is not a mount of the volume's filesystem",
            path.field(),
            quote(&path.lexical().to_string_lossy())
        ))
    };
    let fd = path.open_dir()?.ok_or_else(not)?;
    let st = statx_fd(fd.as_fd())?;
    if !st.mount_root || st.dev != device {
        return Err(not());
    }
    // The fd's mount, by the id statx gave: mountinfo by name is not asked.
    let e = entry(st.mnt_id)?.ok_or_else(|| {
        MountError::Parse(format!(
            "mount {} of {} is not in /proc/self/mountinfo",
            st.mnt_id,
            path.real().display()
        ))
    })?;
    if e.dev != device {
        return Err(not());
    }
    Ok((fd, e))
}

/// `struct xfs_fsop_geom_v1` (`XFS_IOC_FSGEOMETRY_V1`), which every
/// kernel with XFS answers.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct XfsGeometryV1 {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
}

/// `struct xfs_growfs_data` (`XFS_IOC_FSGROWFSDATA`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct XfsGrowfsData {
    newblocks: u64,
    imaxpct: u32,
}

nix::ioctl_read!(xfs_geometry_v1, b'X', 100, XfsGeometryV1);
nix::ioctl_write_ptr!(xfs_growfs_data, b'X', 110, XfsGrowfsData);
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// What `xfs_growfs -d` does, on the fd of the mount's root: the data
/// section to the whole device (the kernel drops a last allocation group
/// too small to keep). Never asks for fewer blocks than it has.
fn grow_xfs(fd: BorrowedFd<'_>, path: &Confined, size: u64) -> Result<(), MountError> {
    let at = || path.real().display().to_string();
    let mut geo = XfsGeometryV1::default();
    // SAFETY: an fd on an xfs filesystem and a correctly sized struct the
    // kernel fills.
    unsafe { xfs_geometry_v1(fd.as_raw_fd(), &mut geo) }
        .map_err(|e| MountError::sys(format!("XFS_IOC_FSGEOMETRY {}", at()), e))?;
    if geo.blocksize == 0 {
        return Err(MountError::Parse(format!(
            "xfs at {} reports a block size of 0",
            at()
        )));
    }
    let blocks = size / u64::from(geo.blocksize);
    if blocks <= geo.datablocks {
        return Ok(());
    }
    let req = XfsGrowfsData {
        newblocks: blocks,
        imaxpct: geo.imaxpct,
    };
    // SAFETY: as above; the kernel only reads the struct.
    unsafe { xfs_growfs_data(fd.as_raw_fd(), &req) }.map_err(|e| {
        MountError::sys(
            format!(
                "XFS_IOC_FSGROWFSDATA {} from {} to {blocks} blocks",
                at(),
                geo.datablocks
            ),
            e,
        )
    })?;
    Ok(())
}

/// What `resize2fs` does for a mounted ext4 on a kernel with online
/// resize: `EXT4_IOC_RESIZE_FS` with the new block count, on the fd of the
/// mount's root.
fn grow_ext4(fd: BorrowedFd<'_>, path: &Confined, size: u64) -> Result<(), MountError> {
    let at = || path.real().display().to_string();
    let s = nix::sys::statvfs::fstatvfs(fd)
        .map_err(|e| MountError::sys(format!("fstatvfs {}", at()), e))?;
    // ext4 reports its block size as f_bsize.
    let bs = s.block_size();
    if bs == 0 {
        return Err(MountError::Parse(format!(
            "ext4 at {} reports a block size of 0",
            at()
        )));
    }
    let blocks: u64 = size / bs;
    // SAFETY: an fd on an ext4 filesystem and a pointer to a u64 the
    // kernel only reads.
    unsafe { ext4_resize_fs(fd.as_raw_fd(), &blocks) }.map_err(|e| {
        MountError::sys(format!("EXT4_IOC_RESIZE_FS {} to {blocks} blocks", at()), e)
    })?;
    Ok(())
}

fn mount_table() -> Result<Vec<MountEntry>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| MountError::io("read /proc/self/mountinfo", e))?;
    mountinfo::parse(&text)
}

fn entry(id: u64) -> Result<Option<MountEntry>, MountError> {
    Ok(mount_table()?
        .into_iter()
        .find(|m| u64::from(m.mount_id) == id))
}

/// `/proc/self/fd/<dir>/<name>`: reaches the top mount on `name` in the
/// directory `dir` refers to, wherever that directory is now, and pins
/// only the parent's mount (an fd of the mount itself would make every
/// unmount of it EBUSY).
fn below(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    fd_path(dir).join(name)
}

/// Undoes a mount this call just made (a check after it failed): the top
/// mount on `name` in `dir`, if it is a mount that did not exist `before`
/// and passes `check`; nothing else is ever unmounted. A mount point cannot
/// be renamed or removed (EBUSY), so the mount is always reachable there,
/// wherever a rename of an ancestor moved the directory.
fn undo_new(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    before: &HashSet<u64>,
    check: &dyn Fn(&Stat) -> bool,
) {
    let at = below(dir, name);
    let ours = step(dir, name, OFlag::empty())
        .ok()
        .and_then(|fd| statx_fd(fd.as_fd()).ok())
        .is_some_and(|st| st.mount_root && !before.contains(&st.mnt_id) && check(&st));
    if !ours {
        tracing::error!(path = %at.display(), "the mount to undo is not there");
        return;
    }
    if let Err(e) = nix::mount::umount2(&at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        tracing::error!(path = %at.display(), error = %e, "cannot undo a mount");
    }
}

fn inspect(path: &Confined) -> Result<Option<PathState>, MountError> {
    let Some(fd) = path.open()? else {
        return Ok(None);
    };
    let st = statx_fd(fd.as_fd())?;
    let mount = if st.mount_root {
        entry(st.mnt_id)?
    } else {
        None
    };
    Ok(Some(PathState {
        kind: st.kind(),
        rdev: st.rdev,
        mount,
    }))
}

/// Mounts onto the descriptor of an existing `target` of type `want` with
/// `op`, then checks that the path, resolved afresh beneath the root, leads
/// to the new mount and that `check` accepts it; otherwise the mount is
/// undone. Returns the parent's fd and the name for further work, and the
/// new mount's root.
fn attach(
    target: &Confined,
    want: u32,
    op: impl FnOnce(BorrowedFd<'_>) -> Result<(), MountError>,
    check: impl Fn(&Stat) -> bool,
) -> Result<(OwnedFd, OsString, Undo, Stat), MountError> {
    let vanished = || {
        MountError::Refused(format!(
            "{} {} vanished while it was being mounted on",
            target.field(),
            quote(&target.lexical().to_string_lossy())
        ))
    };
    let (dir, name) = target.parent(false)?.ok_or_else(vanished)?;
    let leaf = target.open_in(dir.as_fd(), &name)?.ok_or_else(vanished)?;
    let st = statx_fd(leaf.as_fd())?;
    if st.kind() != want {
        return Err(target.wrong_type(
            if want == libc::S_IFDIR {
                "a directory"
            } else {
                "a regular file"
            },
            st.kind(),
        ));
    }
    let before: HashSet<u64> = mount_table()?
        .iter()
        .map(|m| u64::from(m.mount_id))
        .collect();
    op(leaf.as_fd())?;
    drop(leaf);
    // The new mount, reached through the parent we mounted in.
    let undo = |why: MountError| -> MountError {
        undo_new(dir.as_fd(), &name, &before, &check);
        why
    };
    let ours = match target.open_in(dir.as_fd(), &name) {
        Ok(Some(fd)) => statx_fd(fd.as_fd()).map_err(undo)?,
        Ok(None) => return Err(undo(vanished())),
        Err(e) => return Err(undo(e)),
    };
    if !ours.mount_root || !check(&ours) {
        return Err(undo(MountError::Refused(format!(
            "{} {} changed while it was being mounted on; the mount was undone",
            target.field(),
            quote(&target.lexical().to_string_lossy())
        ))));
    }
    // The path itself, walked again from the root, must lead there too.
    let now = match target.open() {
        Ok(Some(fd)) => statx_fd(fd.as_fd()).map_err(undo)?,
        Ok(None) => return Err(undo(vanished())),
        Err(e) => return Err(undo(e)),
    };
    if now.mnt_id != ours.mnt_id {
        return Err(undo(MountError::Refused(format!(
            "{} {} was moved while it was being mounted on; the mount was undone",
            target.field(),
            quote(&target.lexical().to_string_lossy())
        ))));
    }
    Ok((dir, name, Undo { before }, ours))
}

/// What [`undo_new`] needs to recognise a mount made by [`attach`].
struct Undo {
    before: HashSet<u64>,
}

/// The fd of a bind source after checking that it shows `device`, the
/// file type the target needs, and a name for messages.
fn open_source(source: &BindSource, device: u64) -> Result<(OwnedFd, u32, String), MountError> {
    match source {
        BindSource::Device(p) => {
            // The backend's device path, not a request's: it may be a link
            // (lvm's /dev/VG/LV -> ../dm-N); what it opens is checked below.
            let fd = nix::fcntl::open(
                p,
                OFlag::O_PATH | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| MountError::sys(format!("open {}", p.display()), e))?;
            let st = statx_fd(fd.as_fd())?;
            if st.kind() != libc::S_IFBLK || st.rdev != device {
                return Err(MountError::Refused(format!(
                    "{} is no longer the volume's block device",
                    p.display()
                )));
            }
            Ok((fd, libc::S_IFREG, p.display().to_string()))
        }
        BindSource::Staging(c) => {
            let shown = c.real().display().to_string();
            let not = || {
                MountError::Refused(format!(
                    "{} {} is not a mount of the volume",
                    c.field(),
                    quote(&c.lexical().to_string_lossy())
                ))
            };
            let fd = c.open()?.ok_or_else(not)?;
            let st = statx_fd(fd.as_fd())?;
            if !st.mount_root || st.dev != device {
                return Err(not());
            }
            Ok((fd, libc::S_IFDIR, shown))
        }
    }
}

fn unmount(target: &Confined, device: u64) -> Result<Unmounted, MountError> {
    let Some((dir, name)) = target.parent(false)? else {
        return Ok(Unmounted::NotMounted);
    };
    let st = match target.open_in(dir.as_fd(), &name)? {
        Some(fd) => statx_fd(fd.as_fd())?,
        None => return Ok(Unmounted::NotMounted),
    };
    if !st.mount_root {
        return Ok(Unmounted::NotMounted);
    }
    let shows = st.dev == device || (st.kind() == libc::S_IFBLK && st.rdev == device);
    if !shows {
        // Only a foreign mount is reported by its entry; ours is not looked up.
        let e = entry(st.mnt_id)?.ok_or_else(|| {
            MountError::Parse(format!(
                "mount {} of {} is not in /proc/self/mountinfo",
                st.mnt_id,
                target.real().display()
            ))
        })?;
        return Ok(Unmounted::Foreign(e));
    }
    let at = below(dir.as_fd(), &name);
    match nix::mount::umount2(&at, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(Unmounted::Done),
        Err(Errno::EBUSY) => Err(MountError::Refused(format!(
            "{} {} is busy (a process still uses the mount); retry when it is released",
            target.field(),
            quote(&target.lexical().to_string_lossy())
        ))),
        Err(e) => Err(MountError::sys(
            format!("unmount {}", target.real().display()),
            e,
        )),
    }
}

fn remove(path: &Confined, leaf: Leaf) -> Result<Removed, MountError> {
    let Some((dir, name)) = path.parent(false)? else {
        return Ok(Removed::Absent);
    };
    let Some(fd) = path.open_in(dir.as_fd(), &name)? else {
        return Ok(Removed::Absent);
    };
    let st = statx_fd(fd.as_fd())?;
    drop(fd);
    if st.mount_root {
        return Ok(Removed::Kept("something is mounted on it".into()));
    }
    let flag = match (leaf, st.kind()) {
        (Leaf::Dir, libc::S_IFDIR) => UnlinkatFlags::RemoveDir,
        (Leaf::File, libc::S_IFREG) if st.size == 0 => UnlinkatFlags::NoRemoveDir,
        (Leaf::File, libc::S_IFREG) => {
            return Ok(Removed::Kept(format!(
                "it is a regular file of {} bytes, not the empty file a block publish creates",
                st.size
            )));
        }
        (_, k) => {
            return Ok(Removed::Kept(format!(
                "it is {}",
                match k {
                    libc::S_IFDIR => "a directory",
                    libc::S_IFREG => "a regular file",
                    _ => "neither a directory nor a regular file",
                }
            )));
        }
    };
    match nix::unistd::unlinkat(dir.as_fd(), name.as_os_str(), flag) {
        Ok(()) => Ok(Removed::Yes),
        Err(Errno::ENOENT) => Ok(Removed::Absent),
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
            Ok(Removed::Kept("the directory is not empty".into()))
        }
        Err(Errno::EBUSY) => Ok(Removed::Kept("something is mounted on it".into())),
        Err(e) => Err(MountError::sys(
            format!("remove {}", path.real().display()),
            e,
        )),
    }
}

/// `struct fsxattr` of `FS_IOC_FSGETXATTR` / `FS_IOC_FSSETXATTR`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// New files in a directory with it inherit the extent size hint.
const FS_XFLAG_EXTSZINHERIT: u32 = 0x0000_1000;

nix::ioctl_read!(fs_get_xattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_set_xattr, b'X', 32, FsXattr);

/// The 2 MiB extent size hint (what `xfs_io -c "extsize 2m"` sets), on the
/// root of the mount at `dir`, through an fd opened beneath the root.
fn set_extent_hint(dir: &Confined) -> Result<(), MountError> {
    let (parent, name) = dir
        .parent(false)?
        .ok_or_else(|| MountError::Refused(format!("{} vanished", dir.real().display())))?;
    extent_hint_below(parent.as_fd(), &name, dir)
}

/// The hint on the mount root reached as `name` in `parent`.
fn extent_hint_below(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    dir: &Confined,
) -> Result<(), MountError> {
    let fd = nix::fcntl::openat2(
        parent,
        name,
        nix::fcntl::OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                nix::fcntl::ResolveFlag::RESOLVE_BENEATH
                    | nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS
                    | nix::fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
            ),
    )
    .map_err(|e| MountError::sys(format!("open {}", dir.real().display()), e))?;
    let mut x = FsXattr::default();
    // SAFETY: a directory fd and a correctly sized struct fsxattr.
    unsafe { fs_get_xattr(fd.as_raw_fd(), &mut x) }
        .map_err(|e| MountError::sys(format!("FS_IOC_FSGETXATTR {}", dir.real().display()), e))?;
    x.extsize = 2 << 20;
    x.xflags |= FS_XFLAG_EXTSZINHERIT;
    // SAFETY: as above; the kernel only reads the struct.
    unsafe { fs_set_xattr(fd.as_raw_fd(), &x) }
        .map_err(|e| MountError::sys(format!("FS_IOC_FSSETXATTR {}", dir.real().display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root: when a rename moves an ancestor out of the root right after
    /// the mount(2), the re-walk sees it and the mount is undone where it
    /// went; nothing stays mounted.
    #[test]
    fn a_mount_moved_by_a_race_is_undone() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let k = base.join("kubelet");
        std::fs::create_dir_all(k.join("a/leaf")).unwrap();
        let root = super::super::KubeletRoot::new(&k);
        let t = root
            .check("target_path", k.join("a/leaf").to_str().unwrap())
            .unwrap();
        let moved = base.join("outside-a");
        let err = attach(
            &t,
            libc::S_IFDIR,
            |leaf| {
                nix::mount::mount(
                    Some("tmpfs"),
                    &fd_path(leaf),
                    Some("tmpfs"),
                    MsFlags::empty(),
                    Some("size=1m"),
                )
                .map_err(|e| MountError::sys("mount tmpfs", e))?;
                std::fs::rename(k.join("a"), &moved).unwrap();
                Ok(())
            },
            |st| st.mount_root,
        )
        .map(drop)
        .unwrap_err();
        assert!(matches!(err, MountError::Refused(_)), "{err}");
        let left: Vec<MountEntry> = mount_table()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&base))
            .collect();
        assert!(left.is_empty(), "{left:#?}");
        assert!(moved.is_dir());
    }

    #[test]
    fn blkid_output() {
        assert_eq!(
            parse_blkid(
                "DEVNAME=/dev/loop0\nUUID=x\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(parse_blkid("TYPE=xfs\n"), Probe::Filesystem("xfs".into()));
        assert_eq!(
            parse_blkid("PTUUID=abc\nPTTYPE=gpt\n"),
            Probe::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid("TYPE=swap\nUSAGE=other\n"),
            Probe::Other("a other signature (swap)".into())
        );
        assert!(matches!(parse_blkid(""), Probe::Other(_)));
    }

    #[test]
    fn dumpe2fs_output() {
        let out = "Filesystem volume name:   <none>\nBlock count:              204800\nReserved block count:     10240\nBlock size:               4096\n";
        assert_eq!(parse_dumpe2fs(out), Some(204800 * 4096));
        assert_eq!(parse_dumpe2fs("Block size: 4096\n"), None);
    }

    #[test]
    fn mkfs_layout_for_huge_pages() {
        let small = mkfs_argv(FsType::Xfs, "/dev/x", 304 << 20).join(" ");
        assert!(small.contains("su=2m,sw=1,agcount=2"), "{small}");
        assert!(small.contains("reflink=0"), "{small}");
        let big = mkfs_argv(FsType::Xfs, "/dev/x", 4 << 30).join(" ");
        assert!(big.ends_with("-d su=2m,sw=1 /dev/x"), "{big}");
        assert!(!big.contains(" -f"), "never force: {big}");
        let e = mkfs_argv(FsType::Ext4, "/dev/x", 1 << 30).join(" ");
        assert!(e.contains("stride=512,stripe_width=512"), "{e}");
        assert!(!e.contains(" -F"), "never force: {e}");
    }
}

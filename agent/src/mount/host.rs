//! The real host: mount syscalls, `/proc/self/mountinfo`, sysfs, and the
//! filesystem tools run with deadlines. Syscalls run on the blocking pool.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::exec::{self, run, run_ok};
use super::{FsStats, FsType, Host, MountEntry, MountError, MountSpec, Probe, mountinfo};

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
        blocking("mountinfo", || {
            let text = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| MountError::io("read /proc/self/mountinfo", e))?;
            mountinfo::parse(&text)
        })
        .await
    }

    async fn mount(&self, spec: &MountSpec) -> Result<(), MountError> {
        let spec = spec.clone();
        blocking("mount", move || {
            let data = spec.data.join(",");
            nix::mount::mount(
                Some(&spec.source),
                &spec.target,
                Some(spec.fs_type.as_str()),
                spec.flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|e| {
                MountError::sys(
                    format!(
                        "mount {} on {} (type {}, flags {:?}, options {:?})",
                        spec.source.display(),
                        spec.target.display(),
                        spec.fs_type,
                        spec.flags,
                        data
                    ),
                    e,
                )
            })
        })
        .await
    }

    async fn bind(&self, source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
        let (source, target) = (source.to_owned(), target.to_owned());
        blocking("bind mount", move || {
            nix::mount::mount(
                Some(&source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                MountError::sys(
                    format!("bind mount {} on {}", source.display(), target.display()),
                    e,
                )
            })?;
            if flags.is_empty() {
                return Ok(());
            }
            let remount = nix::mount::mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                None::<&str>,
            );
            if let Err(e) = remount {
                // Do not leave a mount without the asked-for protection.
                let _ = nix::mount::umount2(&target, MntFlags::UMOUNT_NOFOLLOW);
                return Err(MountError::sys(
                    format!("remount bind {} with {flags:?}", target.display()),
                    e,
                ));
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let target = target.to_owned();
        blocking("unmount", move || {
            match nix::mount::umount2(&target, MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(MountError::sys(format!("unmount {}", target.display()), e)),
            }
        })
        .await
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

    async fn set_extent_hint(&self, dir: &Path) -> Result<(), MountError> {
        run_ok(
            &["xfs_io", "-c", "extsize 2m", path_str(dir)?],
            TOOL_DEADLINE,
        )
        .await
        .map(|_| ())
    }

    async fn statvfs(&self, path: &Path) -> Result<FsStats, MountError> {
        let path = path.to_owned();
        blocking("statvfs", move || {
            let s = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| MountError::sys(format!("statvfs {}", path.display()), e))?;
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
        dev: &Path,
        mountpoint: &Path,
    ) -> Result<(), MountError> {
        let argv = match fs {
            FsType::Xfs => ["xfs_growfs", path_str(mountpoint)?],
            FsType::Ext4 => ["resize2fs", path_str(dev)?],
        };
        run_ok(&argv, GROW_DEADLINE).await.map(|_| ())
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

    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        let path = path.to_owned();
        blocking("mkdir", move || {
            std::fs::create_dir_all(&path)
                .map_err(|e| MountError::io(format!("create directory {}", path.display()), e))
        })
        .await
    }

    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        let path = path.to_owned();
        blocking("create file", move || {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    MountError::io(format!("create directory {}", parent.display()), e)
                })?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map(drop)
                .map_err(|e| MountError::io(format!("create file {}", path.display()), e))
        })
        .await
    }

    async fn remove(&self, path: &Path) -> Result<(), MountError> {
        let path = path.to_owned();
        blocking("remove", move || {
            let res = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(MountError::io(format!("remove {}", path.display()), e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! The host-OS layer of the Node service: mounts, filesystems and block
//! devices, behind the [`Host`] trait so the RPC logic can be tested without
//! root. [`host::RealHost`] uses mount syscalls, `/proc/self/mountinfo`,
//! sysfs and the filesystem tools; `fake::FakeHost` (tests) keeps all of it
//! in memory and records every call.

pub mod confine;
pub mod exec;
#[cfg(test)]
pub mod fake;
pub mod host;
pub mod mountinfo;
pub mod paths;

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;

pub use crate::csi::params::FsType;
use crate::error::AgentError;
pub use confine::{Confined, KubeletRoot, PathError};
pub use mountinfo::MountEntry;

/// xfs refuses filesystems below 300 MiB (xfsprogs ≥ 5.19).
pub const XFS_MIN_BYTES: u64 = 300 << 20;

/// Errors of the host layer. They become `Internal` at the RPC boundary
/// unless the node logic decided on a more precise code first.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A system call failed; `op` says what was attempted on what.
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{argv} failed ({status}): {stderr}")]
    Command {
        argv: String,
        status: String,
        stderr: String,
    },
    #[error("{argv} did not finish within {}s and was killed", after.as_secs())]
    Timeout { argv: String, after: Duration },
    #[error("cannot run {argv}: {source}")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    /// A malformed request path (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// The node's state refuses the call (FailedPrecondition): a path of
    /// the wrong type, a foreign mount, a device in use.
    #[error("{0}")]
    Refused(String),
    /// Mounted with dax but the kernel did not enable it (undone); the
    /// mount's superblock options.
    #[error("the kernel did not enable DAX (options {0})")]
    NoDax(String),
}

impl MountError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> MountError {
        MountError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn sys(op: impl Into<String>, source: nix::errno::Errno) -> MountError {
        MountError::Sys {
            op: op.into(),
            source,
        }
    }

    /// The errno of a failed system call, if that is what this is.
    pub fn errno(&self) -> Option<nix::errno::Errno> {
        match self {
            MountError::Sys { source, .. } => Some(*source),
            _ => None,
        }
    }
}

impl From<MountError> for AgentError {
    fn from(e: MountError) -> AgentError {
        match e {
            MountError::Invalid(m) => AgentError::InvalidArgument(m),
            MountError::Refused(m) => AgentError::FailedPrecondition(m),
            MountError::Sys {
                source: nix::errno::Errno::EBUSY,
                ..
            } => AgentError::FailedPrecondition(format!("{e} (in use)")),
            e => AgentError::Internal(e.to_string()),
        }
    }
}

/// What `blkid -p` finds on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: safe to format.
    Empty,
    /// A filesystem of this type (`xfs`, `ext4`, ...).
    Filesystem(String),
    /// Something else (partition table, swap, RAID member, ...), described.
    Other(String),
}

/// A filesystem mount to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The block device (a path the backend reported, not a request path).
    pub source: PathBuf,
    /// Its `st_rdev`: the new mount must show this device.
    pub device: u64,
    pub target: Confined,
    pub fs_type: String,
    pub flags: MsFlags,
    /// Filesystem-specific options, comma-joined into the data argument.
    pub data: Vec<String>,
    /// The new mount must run with DAX; otherwise it is undone
    /// ([`MountError::NoDax`]).
    pub dax_required: bool,
    /// Set the 2 MiB extent size hint on its root (xfs, read-write).
    pub extent_hint: bool,
}

/// What a bind mount shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSource {
    /// A device node (for raw block volumes).
    Device(PathBuf),
    /// The root of the staging mount at this path.
    Staging(Confined),
}

/// A confined path as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// File type bits (`libc::S_IFDIR`, `S_IFREG`, `S_IFBLK`, ...).
    pub kind: u32,
    /// `st_rdev` when it is a device node.
    pub rdev: u64,
    /// The top mount, when the path is the root of one.
    pub mount: Option<MountEntry>,
}

impl PathState {
    /// Whether the top mount shows device `dev`: a filesystem on it, or a
    /// bind of its device node.
    pub fn shows(&self, dev: u64) -> bool {
        self.mount
            .as_ref()
            .is_some_and(|m| m.dev == dev || (self.kind == libc::S_IFBLK && self.rdev == dev))
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
}

/// What an unmount found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmounted {
    /// The top mount showed the device and is gone.
    Done,
    /// Nothing is mounted there (or the path does not exist).
    NotMounted,
    /// Something else is mounted there; left alone.
    Foreign(MountEntry),
}

/// What is removed at a confined path after its mount is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// An empty directory (a filesystem publish target).
    Dir,
    /// An empty regular file (a block publish target).
    File,
}

/// What a removal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    Yes,
    Absent,
    /// Left in place, and why (not empty, another type, still mounted).
    Kept(String),
}

/// `statvfs` numbers, in fragments (`block_size` bytes) and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// Everything the Node service needs from the operating system.
#[tonic::async_trait]
pub trait Host: Send + Sync + Debug {
    /// The mount table of this process's namespace.
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError>;
    /// What is at a confined path now (`None`: it does not exist).
    async fn inspect(&self, path: &Confined) -> Result<Option<PathState>, MountError>;
    /// Mounts a filesystem onto the (existing) directory `spec.target`
    /// through its descriptor and checks that the new mount is the one the
    /// path now leads to (and has DAX when required); otherwise, or when a
    /// later step fails, the mount is undone. Returns the new mount.
    async fn mount(&self, spec: &MountSpec) -> Result<MountEntry, MountError>;
    /// Bind-mounts `source` (which must show `device`) on `target` (an
    /// existing directory or file), then applies the per-mount `flags`
    /// (read-only, nosuid, ...) with a bind remount when there are any.
    async fn bind(
        &self,
        source: &BindSource,
        target: &Confined,
        device: u64,
        flags: MsFlags,
    ) -> Result<(), MountError>;
    /// Unmounts the top mount at `target` if it shows `device`.
    async fn unmount(&self, target: &Confined, device: u64) -> Result<Unmounted, MountError>;
    /// `st_rdev` when `path` is (or is a bind mount of) a block device;
    /// `None` when it does not exist or is something else.
    async fn device_number(&self, path: &Path) -> Result<Option<u64>, MountError>;
    /// Size of a block device in bytes.
    async fn device_size(&self, dev: &Path) -> Result<u64, MountError>;
    /// Whether the block device supports DAX (`queue/dax` in sysfs).
    async fn dax_supported(&self, dev: &Path) -> bool;
    /// Signatures on the device.
    async fn probe(&self, dev: &Path) -> Result<Probe, MountError>;
    /// Makes a filesystem laid out for 2 MiB pages.
    async fn mkfs(&self, dev: &Path, fs: FsType) -> Result<(), MountError>;
    /// Sets a 2 MiB extent size hint on the root of the xfs mount at
    /// `dir` (inherited by new files).
    async fn set_extent_hint(&self, dir: &Confined) -> Result<(), MountError>;
    /// `statvfs` of the filesystem at `path`, through a descriptor opened
    /// beneath the root, which must be the root of a mount of a filesystem
    /// on `device` (else FailedPrecondition).
    async fn statvfs(&self, path: &Confined, device: u64) -> Result<FsStats, MountError>;
    /// Size of the ext4 filesystem on `dev` in bytes (from its superblock).
    async fn ext4_size(&self, dev: &Path) -> Result<u64, MountError>;
    /// Grows the filesystem mounted at `path` to `size` bytes while it is
    /// mounted, through a descriptor of the mount's root opened beneath the
    /// root and checked to be a mount of a filesystem on `device`, so no
    /// rename or symlink can point the grow at another filesystem.
    async fn grow_online(
        &self,
        fs: FsType,
        path: &Confined,
        device: u64,
        size: u64,
    ) -> Result<(), MountError>;
    /// Checks and grows an unmounted ext4 filesystem to the device size.
    async fn grow_offline_ext4(&self, dev: &Path) -> Result<(), MountError>;
    /// Creates a directory (and missing parents) beneath the root; an
    /// existing directory is fine, anything else is FailedPrecondition.
    async fn make_dir(&self, path: &Confined) -> Result<(), MountError>;
    /// Creates an empty regular file (and missing parent directories);
    /// an existing one is fine.
    async fn make_file(&self, path: &Confined) -> Result<(), MountError>;
    /// Removes an empty directory or an empty regular file that is not
    /// mounted on; anything else stays.
    async fn remove(&self, path: &Confined, leaf: Leaf) -> Result<Removed, MountError>;
}

/// Mount flags split into syscall flags and filesystem data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl MountOptions {
    /// The flags a bind remount can set per mount point.
    pub fn per_mount(&self) -> MsFlags {
        self.flags
            & (MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
                | MsFlags::MS_STRICTATIME)
    }
}

/// Turns CSI `mount_flags` into syscall flags and data. Entries may hold
/// several comma-separated options. Options that change what is mounted
/// (`bind`, `remount`, `move`, ...) are refused; unknown options go to the
/// filesystem, which rejects what it does not know.
pub fn parse_options(opts: &[String]) -> Result<MountOptions, String> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts.iter().flat_map(|e| e.split(',')) {
        let (set, clear) = match o {
            "" | "defaults" => continue,
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "bind" | "rbind" | "remount" | "move" | "loop" | "shared" | "rshared" | "slave"
            | "rslave" | "private" | "rprivate" | "unbindable" | "runbindable" => {
                return Err(format!(
                    "mount flag {o:?} is not allowed: the plugin decides how volumes are mounted"
                ));
            }
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    Ok(MountOptions { flags, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&s(&["noatime,nosuid", "discard", "ro", "defaults"])).unwrap();
        assert!(
            o.flags
                .contains(MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY)
        );
        assert_eq!(o.data, vec!["discard"]);
        assert_eq!(
            o.per_mount(),
            MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY
        );
        let o = parse_options(&s(&["ro", "rw", "sync"])).unwrap();
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
        assert!(o.flags.contains(MsFlags::MS_SYNCHRONOUS));
        assert_eq!(o.per_mount(), MsFlags::empty());
    }

    #[test]
    fn options_refuse_mount_kind_changes() {
        for bad in ["bind", "remount", "rshared"] {
            let e = parse_options(&s(&[bad])).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}

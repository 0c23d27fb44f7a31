//! Path confinement beneath the kubelet root.
//!
//! A request path is first judged lexically ([`KubeletRoot::check`]):
//! absolute, at most `PATH_MAX`, no `..`, beneath the configured root. The
//! result, a [`Confined`] path, is the only form the host layer accepts for
//! anything it creates, mounts on, unmounts or removes. The real host then
//! walks it from an `O_PATH` descriptor of the root, one component at a time,
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`, so no symlink anywhere below the root is ever
//! followed, and acts through the descriptors it got: `mkdirat`/`openat` with
//! the parent's fd and the last name, mounts onto `/proc/self/fd/N` of the
//! target, unmounts through the fd of the mount's root after checking it
//! with `statx` (mount id, `STATX_ATTR_MOUNT_ROOT`). A name swapped for a
//! symlink between two steps is caught by the step that meets it.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, mkdirat};

use super::MountError;

/// Longest path the kernel accepts, terminating NUL included.
pub const PATH_MAX: usize = 4096;
/// Bytes of a client value quoted in a message.
pub const QUOTE_MAX: usize = 128;

/// The default kubelet directory.
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";

/// A client value for a message: debug-quoted, cut at [`QUOTE_MAX`] bytes.
pub fn quote(raw: &str) -> String {
    if raw.len() <= QUOTE_MAX {
        return format!("{raw:?}");
    }
    let mut end = QUOTE_MAX;
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &raw[..end], raw.len())
}

/// Why a request path is refused: a malformed field (InvalidArgument) or a
/// state of the node that does not allow the call (FailedPrecondition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
}

impl From<PathError> for MountError {
    fn from(e: PathError) -> MountError {
        match e {
            PathError::Invalid(m) => MountError::Invalid(m),
            PathError::Precondition(m) => MountError::Refused(m),
        }
    }
}

/// The directory every staging and publish path must lie beneath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletRoot {
    path: PathBuf,
}

impl KubeletRoot {
    /// `path` must be absolute without `..` (the configuration checks it).
    pub fn new(path: impl Into<PathBuf>) -> KubeletRoot {
        KubeletRoot { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root as the mount table shows it (its own symlinks, which the
    /// operator configured, resolved).
    fn real(&self) -> PathBuf {
        std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone())
    }

    /// Judges a request path lexically; nothing on disk is touched except
    /// resolving the root itself.
    pub fn check(&self, field: &'static str, raw: &str) -> Result<Confined, PathError> {
        let q = || quote(raw);
        if raw.is_empty() {
            return Err(PathError::Invalid(format!("{field} is required")));
        }
        if raw.len() >= PATH_MAX {
            return Err(PathError::Invalid(format!(
                "{field} {} is {} bytes, longer than PATH_MAX ({PATH_MAX})",
                q(),
                raw.len()
            )));
        }
        if raw.contains('\0') {
            return Err(PathError::Invalid(format!(
                "{field} {} contains a NUL byte",
                q()
            )));
        }
        let p = Path::new(raw);
        if !p.is_absolute() {
            return Err(PathError::Invalid(format!(
                "{field} {} must be an absolute path",
                q()
            )));
        }
        let mut lexical = PathBuf::from("/");
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => {
                    if n.len() > 255 {
                        return Err(PathError::Invalid(format!(
                            "{field} {} has a component longer than NAME_MAX (255)",
                            q()
                        )));
                    }
                    lexical.push(n);
                }
                Component::ParentDir => {
                    return Err(PathError::Invalid(format!(
                        "{field} {} must not contain \"..\"",
                        q()
                    )));
                }
                Component::Prefix(_) => unreachable!("no path prefixes on Linux"),
            }
        }
        let real_root = self.real();
        let rel = lexical
            .strip_prefix(&self.path)
            .or_else(|_| lexical.strip_prefix(&real_root))
            .map(Path::to_path_buf)
            .map_err(|_| {
                PathError::Invalid(format!(
                    "{field} {} is not under the kubelet root {}",
                    q(),
                    self.path.display()
                ))
            })?;
        if rel.as_os_str().is_empty() {
            return Err(PathError::Invalid(format!(
                "{field} {} is the kubelet root itself, not a path beneath it",
                q()
            )));
        }
        Ok(Confined {
            field,
            root: self.path.clone(),
            real: real_root.join(&rel),
            rel,
            lexical,
        })
    }
}

/// A request path that lies lexically beneath the kubelet root. Only
/// [`KubeletRoot::check`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    field: &'static str,
    root: PathBuf,
    rel: PathBuf,
    /// The request path, normalised (`.` and doubled slashes dropped).
    lexical: PathBuf,
    /// Where it is when nothing below the root is a symlink: the form
    /// mountinfo shows.
    real: PathBuf,
}

impl Confined {
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The normalised request path (for messages and ledger comparison).
    pub fn lexical(&self) -> &Path {
        &self.lexical
    }

    /// The path the mount table shows for it.
    pub fn real(&self) -> &Path {
        &self.real
    }

    /// Relative to the root.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// Whether `stored` (a ledger path) names the same place.
    pub fn same_as(&self, stored: &str) -> bool {
        let n: PathBuf = Path::new(stored).components().collect();
        n == self.lexical || n == self.real
    }

    fn shown(&self) -> String {
        quote(&self.lexical.to_string_lossy())
    }

    fn components(&self) -> Vec<&OsStr> {
        self.rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect()
    }

    /// Turns an errno of a step at `upto` (a prefix of the path) into the
    /// error a client should see.
    fn step_error(&self, e: Errno, upto: &Path) -> MountError {
        let at = self.root.join(upto);
        match e {
            Errno::ELOOP => MountError::Invalid(format!(
                "{} {}: {} is a symbolic link; paths beneath the kubelet root are resolved without following symlinks",
                self.field,
                self.shown(),
                quote(&at.to_string_lossy())
            )),
            Errno::EXDEV => MountError::Invalid(format!(
                "{} {} escapes the kubelet root {}",
                self.field,
                self.shown(),
                self.root.display()
            )),
            Errno::ENOTDIR => MountError::Refused(format!(
                "{} {}: {} exists and is not a directory",
                self.field,
                self.shown(),
                quote(&at.to_string_lossy())
            )),
            Errno::ENAMETOOLONG => {
                MountError::Invalid(format!("{} {} is too long", self.field, self.shown()))
            }
            e => MountError::sys(
                format!("resolve {} beneath {}", at.display(), self.root.display()),
                e,
            ),
        }
    }

    /// An `O_PATH` fd of the root (the operator's own path, followed).
    fn open_root(&self) -> Result<OwnedFd, MountError> {
        nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOENT => MountError::Refused(format!(
                "the kubelet root {} does not exist",
                self.root.display()
            )),
            e => MountError::sys(format!("open the kubelet root {}", self.root.display()), e),
        })
    }

    /// The parent directory's fd and the last name. Missing directories
    /// on the way are created (`mkdirat`) when `create`, else `None`.
    pub fn parent(&self, create: bool) -> Result<Option<(OwnedFd, OsString)>, MountError> {
        let comps = self.components();
        let (last, dirs) = comps
            .split_last()
            .expect("a confined path is below its root");
        let mut fd = self.open_root()?;
        let mut upto = PathBuf::new();
        for name in dirs {
            upto.push(name);
            let next = match step(fd.as_fd(), name, OFlag::O_DIRECTORY) {
                Ok(f) => f,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(fd.as_fd(), *name, Mode::from_bits_truncate(0o750)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.step_error(e, &upto)),
                    }
                    step(fd.as_fd(), name, OFlag::O_DIRECTORY)
                        .map_err(|e| self.step_error(e, &upto))?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(self.step_error(e, &upto)),
            };
            fd = next;
        }
        Ok(Some((fd, (*last).to_owned())))
    }

    /// An `O_PATH` fd of the path itself (the root of the top mount when
    /// something is mounted there); `None` when it does not exist.
    pub fn open(&self) -> Result<Option<OwnedFd>, MountError> {
        let Some((dir, name)) = self.parent(false)? else {
            return Ok(None);
        };
        self.open_in(dir.as_fd(), &name)
    }

    /// The last step of [`Confined::open`], from a parent fd.
    pub fn open_in(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<Option<OwnedFd>, MountError> {
        match step(dir, name, OFlag::empty()) {
            Ok(f) => Ok(Some(f)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.step_error(e, &self.rel)),
        }
    }

    /// A readable descriptor of the directory at the path (the root of the
    /// top mount when something is mounted there), for calls that need more
    /// than `O_PATH` (`fstatvfs`, filesystem ioctls). Walked like
    /// [`Confined::open`]; `None` when it does not exist.
    pub fn open_dir(&self) -> Result<Option<OwnedFd>, MountError> {
        let Some((dir, name)) = self.parent(false)? else {
            return Ok(None);
        };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        match openat2(dir.as_fd(), name.as_os_str(), how) {
            Ok(f) => Ok(Some(f)),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ENOTDIR) => {
                let kind = self
                    .open_in(dir.as_fd(), &name)?
                    .map(|fd| statx_fd(fd.as_fd()).map(|s| s.kind()))
                    .transpose()?
                    .unwrap_or(libc::S_IFREG);
                Err(self.wrong_type("a directory", kind))
            }
            Err(e) => Err(self.step_error(e, &self.rel)),
        }
    }

    /// Creates the path as a directory (and missing parents); an existing
    /// directory is fine, anything else is FailedPrecondition.
    pub fn make_dir(&self) -> Result<OwnedFd, MountError> {
        let (dir, name) = self.parent(true)?.expect("parents were created");
        match mkdirat(
            dir.as_fd(),
            name.as_os_str(),
            Mode::from_bits_truncate(0o750),
        ) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(self.step_error(e, &self.rel)),
        }
        let (fd, st) = self.created(dir.as_fd(), &name)?;
        if st.kind() != libc::S_IFDIR {
            return Err(self.wrong_type("a directory", st.kind()));
        }
        Ok(fd)
    }

    /// Creates the path as an empty regular file (`O_CREAT | O_EXCL |
    /// O_NOFOLLOW`, missing parents as directories); an existing regular
    /// file is fine, anything else is FailedPrecondition.
    pub fn make_file(&self) -> Result<OwnedFd, MountError> {
        let (dir, name) = self.parent(true)?.expect("parents were created");
        match nix::fcntl::openat(
            dir.as_fd(),
            name.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        ) {
            Ok(f) => drop(f),
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(self.step_error(e, &self.rel)),
        }
        let (fd, st) = self.created(dir.as_fd(), &name)?;
        // A block device node here is our own earlier bind of one.
        if st.kind() != libc::S_IFREG && !(st.kind() == libc::S_IFBLK && st.mount_root) {
            return Err(self.wrong_type("a regular file", st.kind()));
        }
        Ok(fd)
    }

    /// The fd and `statx` of what [`Confined::make_dir`] or
    /// [`Confined::make_file`] just created (or found) at `name` in `dir`.
    fn created(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<(OwnedFd, Stat), MountError> {
        let fd = self.open_in(dir, name)?.ok_or_else(|| {
            MountError::Refused(format!(
                "{} {} vanished right after it was created",
                self.field,
                self.shown()
            ))
        })?;
        let st = statx_fd(fd.as_fd())?;
        Ok((fd, st))
    }

    pub fn wrong_type(&self, want: &str, got: u32) -> MountError {
        MountError::Refused(format!(
            "{} {} exists as {} but {want} is needed here",
            self.field,
            self.shown(),
            kind_name(got)
        ))
    }
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFREG => "a regular file",
        libc::S_IFBLK => "a block device",
        libc::S_IFCHR => "a character device",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        _ => "an unknown file type",
    }
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// One name beneath `dir`, never through a symlink.
pub(super) fn step(dir: BorrowedFd<'_>, name: &OsStr, extra: OFlag) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | extra)
        .resolve(resolve_flags());
    openat2(dir, name, how)
}

/// What `statx` says about an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub mode: u32,
    pub mnt_id: u64,
    /// The fd is the root of its mount.
    pub mount_root: bool,
    /// `st_dev` (the filesystem).
    pub dev: u64,
    /// `st_rdev` (for device nodes).
    pub rdev: u64,
    pub size: u64,
}

impl Stat {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// `statx` of an fd (no path, no symlinks).
pub fn statx_fd(fd: BorrowedFd<'_>) -> Result<Stat, MountError> {
    let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: a valid fd, an empty NUL-terminated path with AT_EMPTY_PATH,
    // and a buffer of the right size that the kernel fills.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE | libc::STATX_SIZE | libc::STATX_MNT_ID,
            buf.as_mut_ptr(),
        )
    };
    Errno::result(rc).map_err(|e| MountError::sys("statx", e))?;
    // SAFETY: statx succeeded and initialised the buffer.
    let s = unsafe { buf.assume_init() };
    if s.stx_mask & libc::STATX_MNT_ID == 0
        || s.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 == 0
    {
        return Err(MountError::Parse(
            "the kernel's statx reports no mount id or mount root (Linux 5.8 or later is needed)"
                .into(),
        ));
    }
    Ok(Stat {
        mode: u32::from(s.stx_mode),
        mnt_id: s.stx_mnt_id,
        mount_root: s.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0,
        dev: nix::sys::stat::makedev(u64::from(s.stx_dev_major), u64::from(s.stx_dev_minor)),
        rdev: nix::sys::stat::makedev(u64::from(s.stx_rdev_major), u64::from(s.stx_rdev_minor)),
        size: s.stx_size,
    })
}

/// The magic link through which a syscall taking a path reaches `fd`.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, KubeletRoot) {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let root = base.join("kubelet");
        std::fs::create_dir_all(&root).unwrap();
        (d, base, KubeletRoot::new(&root))
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn lexical_checks() {
        let (_d, base, root) = setup();
        let inv = |raw: &str| match root.check("target_path", raw) {
            Err(PathError::Invalid(m)) => m,
            other => panic!("{raw:?}: {other:?}"),
        };
        assert!(inv("").contains("required"));
        assert!(inv("rel/dir").contains("absolute"));
        assert!(inv(&format!("{}/a/../b", s(root.path()))).contains(".."));
        assert!(inv("/a\0b").contains("NUL"));
        assert!(inv(s(&base.join("elsewhere/vol"))).contains("not under the kubelet root"));
        assert!(inv(s(&base.join("kubelet2/x"))).contains("not under"));
        assert!(inv(s(root.path())).contains("root itself"));
        let long = format!("{}/{}", s(root.path()), "a/".repeat(2100));
        let m = inv(&long);
        assert!(m.contains("PATH_MAX"), "{m}");
        assert!(
            m.len() < 400,
            "the value is quoted in part: {} bytes",
            m.len()
        );
        assert!(inv(&format!("{}/{}", s(root.path()), "n".repeat(256))).contains("NAME_MAX"));
        let c = root
            .check("target_path", &format!("{}//pods/./x/", s(root.path())))
            .unwrap();
        assert_eq!(c.rel(), Path::new("pods/x"));
        assert_eq!(c.real(), root.path().join("pods/x"));
        assert!(c.same_as(&format!("{}/pods/x", s(root.path()))));
        assert!(!c.same_as(&format!("{}/pods/y", s(root.path()))));
    }

    #[test]
    fn a_symlinked_root_accepts_both_spellings() {
        let (_d, base, root) = setup();
        let alias = base.join("alias");
        std::os::unix::fs::symlink(root.path(), &alias).unwrap();
        let r = KubeletRoot::new(&alias);
        let a = r.check("p", s(&alias.join("pods/a"))).unwrap();
        assert_eq!(a.real(), root.path().join("pods/a"));
        let b = r.check("p", s(&root.path().join("pods/a"))).unwrap();
        assert_eq!(b.rel(), a.rel());
    }

    #[test]
    fn no_symlink_is_followed_anywhere_below_the_root() {
        let (_d, base, root) = setup();
        let outside = base.join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, root.path().join("evil")).unwrap();
        // An ancestor that is a symlink: InvalidArgument, nothing created outside.
        let c = root
            .check("target_path", s(&root.path().join("evil/sub/vol")))
            .unwrap();
        let e = c.make_dir().unwrap_err();
        assert!(
            matches!(e, MountError::Invalid(ref m) if m.contains("symbolic link")),
            "{e}"
        );
        assert!(!outside.join("sub/vol").exists());
        let e = c.open().unwrap_err();
        assert!(matches!(e, MountError::Invalid(_)), "{e}");
        // The last component a symlink.
        let c = root
            .check("target_path", s(&root.path().join("evil")))
            .unwrap();
        assert!(matches!(c.make_dir().unwrap_err(), MountError::Invalid(_)));
        assert!(matches!(c.make_file().unwrap_err(), MountError::Invalid(_)));
        assert!(matches!(c.open().unwrap_err(), MountError::Invalid(_)));
        // A dangling symlink is refused the same way (never created through).
        std::os::unix::fs::symlink(base.join("nowhere"), root.path().join("dangle")).unwrap();
        let c = root
            .check("target_path", s(&root.path().join("dangle")))
            .unwrap();
        assert!(matches!(c.make_file().unwrap_err(), MountError::Invalid(_)));
        assert!(!base.join("nowhere").exists());
    }

    #[test]
    fn creates_beneath_the_root_and_judges_types() {
        let (_d, _base, root) = setup();
        let c = root
            .check("staging_target_path", s(&root.path().join("a/b/c")))
            .unwrap();
        assert!(c.open().unwrap().is_none());
        let fd = c.make_dir().unwrap();
        assert_eq!(statx_fd(fd.as_fd()).unwrap().kind(), libc::S_IFDIR);
        assert!(root.path().join("a/b/c").is_dir());
        // Again: fine.
        c.make_dir().unwrap();
        // A file where a directory is needed and the reverse.
        let e = c.make_file().unwrap_err();
        assert!(
            matches!(e, MountError::Refused(ref m) if m.contains("a directory")),
            "{e}"
        );
        let f = root
            .check("target_path", s(&root.path().join("a/file")))
            .unwrap();
        f.make_file().unwrap();
        f.make_file().unwrap();
        assert!(root.path().join("a/file").is_file());
        let e = f.make_dir().unwrap_err();
        assert!(
            matches!(e, MountError::Refused(ref m) if m.contains("regular file")),
            "{e}"
        );
        // A file as an ancestor.
        let g = root
            .check("target_path", s(&root.path().join("a/file/x")))
            .unwrap();
        let e = g.make_dir().unwrap_err();
        assert!(
            matches!(e, MountError::Refused(ref m) if m.contains("not a directory")),
            "{e}"
        );
        // A missing root.
        let r = KubeletRoot::new(root.path().join("missing"));
        let c = r.check("p", s(&root.path().join("missing/x"))).unwrap();
        assert!(matches!(c.make_dir().unwrap_err(), MountError::Refused(_)));
    }

    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quote("abc"), "\"abc\"");
        let q = quote(&"é".repeat(1000));
        assert!(q.len() < 160 && q.contains("2000 bytes"), "{q}");
    }
}

//! An in-memory host for unit tests: devices, filesystems and a mount table
//! that behave like the kernel's in the ways the Node service relies on,
//! plus a log of every mutating call and injectable failures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::mount::MsFlags;
use nix::sys::stat::makedev;

use super::{
    BindSource, Confined, FsStats, FsType, Host, Leaf, MountEntry, MountError, MountSpec,
    PathState, Probe, Removed, Unmounted,
};

/// Devices under this directory appear on first use.
pub const FAKE_DEV_DIR: &str = "/dev/fake/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDevice {
    pub rdev: u64,
    pub size: u64,
    pub fs: Option<String>,
    /// Bytes the filesystem spans (grows with resize).
    pub fs_size: u64,
    pub dax: bool,
    /// The "kernel" silently mounts without DAX although asked.
    pub ignore_dax: bool,
    /// Anything blkid would see that is not a filesystem.
    pub other_signature: Option<String>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub mounts: Vec<MountEntry>,
    pub devices: BTreeMap<PathBuf, FakeDevice>,
    /// Targets that are bind mounts of a device node, with its rdev.
    pub block_binds: BTreeMap<PathBuf, u64>,
    pub dirs: BTreeSet<PathBuf>,
    pub files: BTreeSet<PathBuf>,
    /// Paths that are symbolic links: a confined path through one of them
    /// is refused, as the real host refuses it.
    pub symlinks: BTreeSet<PathBuf>,
    /// Every mutating call, e.g. `mkfs /dev/fake/x xfs`.
    pub calls: Vec<String>,
    /// Operations (`mount`, `bind`, `unmount`, `mkfs`, `grow_online`, ...)
    /// that fail with the given message until cleared.
    pub fail: BTreeMap<String, String>,
    pub default_size: u64,
    pub default_dax: bool,
    next_mount: u32,
    next_minor: u64,
}

#[derive(Debug)]
pub struct FakeHost {
    state: Mutex<FakeState>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

fn err(op: &str, msg: &str) -> MountError {
    MountError::Command {
        argv: op.to_owned(),
        status: "exit status 1".into(),
        stderr: msg.to_owned(),
    }
}

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost {
            state: Mutex::new(FakeState {
                default_size: 1 << 30,
                next_mount: 100,
                ..FakeState::default()
            }),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls logged so far that start with `prefix`.
    pub fn calls(&self, prefix: &str) -> Vec<String> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn fail(&self, op: &str, msg: &str) {
        self.state().fail.insert(op.to_owned(), msg.to_owned());
    }

    pub fn unfail(&self, op: &str) {
        self.state().fail.remove(op);
    }

    /// The top mount at `path`.
    pub fn mount_at(&self, path: &Path) -> Option<MountEntry> {
        self.state()
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .cloned()
    }

    /// Edits a device (creating it first when it is a fake one).
    pub fn with_device<T>(&self, dev: &Path, f: impl FnOnce(&mut FakeDevice) -> T) -> Option<T> {
        let mut st = self.state();
        FakeState::ensure(&mut st, dev);
        st.devices.get_mut(dev).map(f)
    }

    /// A mount made by someone else (no confinement, no checks): a
    /// filesystem on a fake device, or a tmpfs when `source` is no device.
    pub fn mount_raw(&self, source: &Path, target: &Path, fs: &str) {
        let mut st = self.state();
        FakeState::ensure(&mut st, source);
        let dev = match st.devices.get(source) {
            Some(d) => d.rdev,
            None => makedev(0, 77),
        };
        st.dirs.insert(target.to_owned());
        st.push_mount(MountEntry {
            mount_id: 0,
            parent_id: 1,
            dev,
            root: PathBuf::from("/"),
            mount_point: target.to_owned(),
            mount_options: opts(false),
            fs_type: fs.to_owned(),
            source: source.display().to_string(),
            super_options: vec!["rw".into()],
        });
    }

    /// Someone else unmounts the top mount at `target`.
    pub fn unmount_raw(&self, target: &Path) {
        let mut st = self.state();
        if let Some(i) = st.mounts.iter().rposition(|m| m.mount_point == target) {
            st.mounts.remove(i);
            if !st.mounts.iter().any(|m| m.mount_point == target) {
                st.block_binds.remove(target);
            }
        }
    }

    /// Makes a device vanish (as if its namespace were destroyed).
    pub fn remove_device(&self, dev: &Path) {
        let mut st = self.state();
        FakeState::ensure(&mut st, dev);
        st.devices.remove(dev);
        // Keep it from reappearing on the next lookup.
        st.fail
            .insert(format!("gone:{}", dev.display()), String::new());
    }
}

impl FakeState {
    fn ensure(st: &mut FakeState, dev: &Path) {
        if st.devices.contains_key(dev)
            || !dev.starts_with(FAKE_DEV_DIR)
            || st.fail.contains_key(&format!("gone:{}", dev.display()))
        {
            return;
        }
        st.next_minor += 1;
        let d = FakeDevice {
            rdev: makedev(259, st.next_minor),
            size: st.default_size,
            fs: None,
            fs_size: 0,
            dax: st.default_dax,
            ignore_dax: false,
            other_signature: None,
        };
        st.devices.insert(dev.to_owned(), d);
    }

    /// What the real host's resolution beneath the root would refuse.
    fn confine(&self, p: &Confined) -> Result<PathBuf, MountError> {
        let real = p.real().to_owned();
        if let Some(l) = self.symlinks.iter().find(|l| real.starts_with(l)) {
            return Err(MountError::Invalid(format!(
                "{} {}: {} is a symbolic link",
                p.field(),
                p.lexical().display(),
                l.display()
            )));
        }
        if let Some(f) = real.ancestors().skip(1).find(|a| self.files.contains(*a)) {
            return Err(MountError::Refused(format!(
                "{} {}: {} exists and is not a directory",
                p.field(),
                p.lexical().display(),
                f.display()
            )));
        }
        Ok(real)
    }

    fn state_of(&self, real: &Path) -> Option<PathState> {
        let mount = self
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == real)
            .cloned();
        let (kind, rdev) = if let Some(r) = self.block_binds.get(real) {
            (libc::S_IFBLK, *r)
        } else if self.dirs.contains(real) {
            (libc::S_IFDIR, 0)
        } else if self.files.contains(real) {
            (libc::S_IFREG, 0)
        } else if mount.is_some() {
            (libc::S_IFDIR, 0)
        } else {
            return None;
        };
        Some(PathState { kind, rdev, mount })
    }

    /// The device whose filesystem is the top mount at `real` (the
    /// confined `path`), as the real host checks it through its fd.
    fn fs_mounted(
        &self,
        path: &Confined,
        real: &Path,
        device: u64,
    ) -> Result<&FakeDevice, MountError> {
        let not = || {
            MountError::Refused(format!(
                "{} {} is not a mount of the volume's filesystem",
                path.field(),
                path.lexical().display()
            ))
        };
        let m = self
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == real)
            .ok_or_else(not)?;
        if m.dev != device || self.block_binds.contains_key(real) {
            return Err(not());
        }
        self.devices
            .values()
            .find(|d| d.rdev == device)
            .ok_or_else(not)
    }

    fn check(&self, op: &str) -> Result<(), MountError> {
        match self.fail.get(op) {
            Some(msg) => Err(err(op, msg)),
            None => Ok(()),
        }
    }

    fn device(&mut self, dev: &Path) -> Result<&mut FakeDevice, MountError> {
        FakeState::ensure(self, dev);
        self.devices.get_mut(dev).ok_or_else(|| {
            MountError::io(
                format!("open {}", dev.display()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }

    fn push_mount(&mut self, e: MountEntry) {
        self.next_mount += 1;
        self.mounts.push(MountEntry {
            mount_id: self.next_mount,
            ..e
        });
    }
}

fn opts(ro: bool) -> Vec<String> {
    vec![
        if ro { "ro" } else { "rw" }.to_owned(),
        "relatime".to_owned(),
    ]
}

#[tonic::async_trait]
impl Host for FakeHost {
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        let st = self.state();
        st.check("mounts")?;
        Ok(st.mounts.clone())
    }

    async fn inspect(&self, path: &Confined) -> Result<Option<PathState>, MountError> {
        let st = self.state();
        let real = st.confine(path)?;
        Ok(st.state_of(&real))
    }

    async fn mount(&self, spec: &MountSpec) -> Result<MountEntry, MountError> {
        let mut st = self.state();
        st.check("mount")?;
        let target = st.confine(&spec.target)?;
        match st.state_of(&target) {
            Some(s) if s.is_dir() => {}
            Some(s) => return Err(spec.target.wrong_type("a directory", s.kind)),
            None => {
                return Err(MountError::Refused(format!(
                    "{} does not exist",
                    target.display()
                )));
            }
        }
        // A device a test marked as held by someone else: EBUSY.
        if st
            .fail
            .contains_key(&format!("busy:{}", spec.source.display()))
        {
            return Err(MountError::sys(
                format!("mount {}", spec.source.display()),
                nix::errno::Errno::EBUSY,
            ));
        }
        // Options a test marked as unknown to the "kernel": EINVAL.
        if let Some(o) = spec
            .data
            .iter()
            .find(|o| st.fail.contains_key(&format!("option:{o}")))
        {
            return Err(MountError::sys(
                format!("mount with option {o}"),
                nix::errno::Errno::EINVAL,
            ));
        }
        let dax_asked = spec.data.iter().any(|d| d == "dax" || d == "dax=always");
        let d = st.device(&spec.source)?.clone();
        if d.fs.as_deref() != Some(spec.fs_type.as_str()) {
            return Err(MountError::sys(
                format!("mount {} (wrong fs type)", spec.source.display()),
                nix::errno::Errno::EINVAL,
            ));
        }
        if dax_asked && !d.dax && spec.fs_type == "ext4" {
            return Err(MountError::sys("mount with dax", nix::errno::Errno::EINVAL));
        }
        let mut sup = vec!["rw".to_owned()];
        if dax_asked && d.dax && !d.ignore_dax {
            sup.push("dax=always".into());
        } else if spec.fs_type == "xfs" {
            sup.push("dax=never".into());
        }
        sup.extend(spec.data.iter().filter(|o| !o.starts_with("dax")).cloned());
        if d.rdev != spec.device {
            return Err(MountError::Refused("not the expected device".into()));
        }
        st.calls.push(format!(
            "mount {} {} {} {}",
            spec.source.display(),
            target.display(),
            spec.fs_type,
            spec.data.join(",")
        ));
        st.push_mount(MountEntry {
            mount_id: 0,
            parent_id: 1,
            dev: d.rdev,
            root: PathBuf::from("/"),
            mount_point: target.clone(),
            mount_options: opts(spec.flags.contains(MsFlags::MS_RDONLY)),
            fs_type: spec.fs_type.clone(),
            source: spec.source.display().to_string(),
            super_options: sup,
        });
        let e = st.mounts.last().cloned().expect("just pushed");
        if spec.dax_required && !e.dax() {
            st.mounts.pop();
            st.calls.push(format!("unmount {}", target.display()));
            return Err(MountError::NoDax(e.super_options.join(",")));
        }
        if spec.extent_hint && e.fs_type == "xfs" && !e.read_only() {
            if let Err(err) = st.check("set_extent_hint") {
                st.mounts.pop();
                st.calls.push(format!("unmount {}", target.display()));
                return Err(err);
            }
            st.calls.push(format!("extsize {}", target.display()));
        }
        Ok(e)
    }

    async fn bind(
        &self,
        source: &BindSource,
        target: &Confined,
        device: u64,
        flags: MsFlags,
    ) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("bind")?;
        let ro = flags.contains(MsFlags::MS_RDONLY);
        let tgt = st.confine(target)?;
        let want_file = matches!(source, BindSource::Device(_));
        match st.state_of(&tgt) {
            Some(s) if s.kind == libc::S_IFREG && want_file => {}
            Some(s) if s.is_dir() && !want_file => {}
            Some(s) => {
                return Err(target.wrong_type(
                    if want_file {
                        "a regular file"
                    } else {
                        "a directory"
                    },
                    s.kind,
                ));
            }
            None => {
                return Err(MountError::Refused(format!(
                    "{} does not exist",
                    tgt.display()
                )));
            }
        }
        let src_path = match source {
            BindSource::Device(p) => p.clone(),
            BindSource::Staging(c) => st.confine(c)?,
        };
        st.calls.push(format!(
            "bind {} {}{}",
            src_path.display(),
            tgt.display(),
            if ro { " ro" } else { "" }
        ));
        if let BindSource::Device(dev) = source {
            FakeState::ensure(&mut st, dev);
            let d = st.device(dev)?.clone();
            if d.rdev != device {
                return Err(MountError::Refused("not the expected device".into()));
            }
            st.block_binds.insert(tgt.clone(), d.rdev);
            let name = dev.file_name().unwrap_or_default();
            st.push_mount(MountEntry {
                mount_id: 0,
                parent_id: 1,
                dev: makedev(0, 5),
                root: Path::new("/").join(name),
                mount_point: tgt,
                mount_options: opts(ro),
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
                super_options: vec!["rw".into()],
            });
            return Ok(());
        }
        let Some(src) = st
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == src_path && m.dev == device)
            .cloned()
        else {
            return Err(MountError::Refused(format!(
                "{} is not a mount of the volume",
                src_path.display()
            )));
        };
        st.push_mount(MountEntry {
            mount_point: tgt,
            mount_options: opts(ro),
            ..src
        });
        Ok(())
    }

    async fn unmount(&self, target: &Confined, device: u64) -> Result<Unmounted, MountError> {
        let mut st = self.state();
        st.check("unmount")?;
        let tgt = st.confine(target)?;
        let Some(s) = st.state_of(&tgt) else {
            return Ok(Unmounted::NotMounted);
        };
        let Some(m) = s.mount.clone() else {
            return Ok(Unmounted::NotMounted);
        };
        if !s.shows(device) {
            return Ok(Unmounted::Foreign(m));
        }
        if let Some(i) = st.mounts.iter().rposition(|m| m.mount_point == tgt) {
            st.mounts.remove(i);
            st.calls.push(format!("unmount {}", tgt.display()));
            if !st.mounts.iter().any(|m| m.mount_point == tgt) {
                st.block_binds.remove(&tgt);
            }
        }
        Ok(Unmounted::Done)
    }

    async fn device_number(&self, path: &Path) -> Result<Option<u64>, MountError> {
        let mut st = self.state();
        if let Some(r) = st.block_binds.get(path) {
            return Ok(Some(*r));
        }
        FakeState::ensure(&mut st, path);
        Ok(st.devices.get(path).map(|d| d.rdev))
    }

    async fn device_size(&self, dev: &Path) -> Result<u64, MountError> {
        Ok(self.state().device(dev)?.size)
    }

    async fn dax_supported(&self, dev: &Path) -> bool {
        self.state().device(dev).is_ok_and(|d| d.dax)
    }

    async fn probe(&self, dev: &Path) -> Result<Probe, MountError> {
        let mut st = self.state();
        st.check("probe")?;
        let d = st.device(dev)?;
        Ok(match (&d.fs, &d.other_signature) {
            (Some(fs), _) => Probe::Filesystem(fs.clone()),
            (None, Some(o)) => Probe::Other(o.clone()),
            (None, None) => Probe::Empty,
        })
    }

    async fn mkfs(&self, dev: &Path, fs: FsType) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("mkfs")?;
        let d = st.device(dev)?;
        d.fs = Some(fs.as_str().to_owned());
        d.fs_size = d.size;
        st.calls
            .push(format!("mkfs {} {}", dev.display(), fs.as_str()));
        Ok(())
    }

    async fn set_extent_hint(&self, dir: &Confined) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("set_extent_hint")?;
        let d = st.confine(dir)?;
        st.calls.push(format!("extsize {}", d.display()));
        Ok(())
    }

    async fn statvfs(&self, path: &Confined, device: u64) -> Result<FsStats, MountError> {
        let st = self.state();
        st.check("statvfs")?;
        let real = st.confine(path)?;
        let size = st.fs_mounted(path, &real, device)?.fs_size;
        Ok(FsStats {
            block_size: 4096,
            blocks: size / 4096,
            blocks_free: size / 4096 - 10,
            blocks_avail: size / 4096 - 20,
            files: 1000,
            files_free: 997,
        })
    }

    async fn ext4_size(&self, dev: &Path) -> Result<u64, MountError> {
        Ok(self.state().device(dev)?.fs_size)
    }

    async fn grow_online(
        &self,
        fs: FsType,
        path: &Confined,
        device: u64,
        size: u64,
    ) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("grow_online")?;
        let real = st.confine(path)?;
        st.fs_mounted(path, &real, device)?;
        st.calls.push(format!(
            "grow_online {} {} {size}",
            fs.as_str(),
            real.display()
        ));
        if let Some(d) = st.devices.values_mut().find(|d| d.rdev == device) {
            d.fs_size = size.min(d.size);
        }
        Ok(())
    }

    async fn grow_offline_ext4(&self, dev: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("grow_offline_ext4")?;
        st.calls
            .push(format!("grow_offline_ext4 {}", dev.display()));
        let d = st.device(dev)?;
        d.fs_size = d.size;
        Ok(())
    }

    async fn make_dir(&self, path: &Confined) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("make_dir")?;
        let p = st.confine(path)?;
        match st.state_of(&p) {
            Some(s) if s.is_dir() => Ok(()),
            Some(s) => Err(path.wrong_type("a directory", s.kind)),
            None => {
                st.dirs.insert(p);
                Ok(())
            }
        }
    }

    async fn make_file(&self, path: &Confined) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("make_file")?;
        let p = st.confine(path)?;
        match st.state_of(&p) {
            Some(s) if s.kind == libc::S_IFREG || s.kind == libc::S_IFBLK => Ok(()),
            Some(s) => Err(path.wrong_type("a regular file", s.kind)),
            None => {
                st.files.insert(p);
                Ok(())
            }
        }
    }

    async fn remove(&self, path: &Confined, leaf: Leaf) -> Result<Removed, MountError> {
        let mut st = self.state();
        st.check("remove")?;
        let p = st.confine(path)?;
        if st.mounts.iter().any(|m| m.mount_point == p) {
            return Ok(Removed::Kept("something is mounted on it".into()));
        }
        if st.fail.contains_key(&format!("not-empty:{}", p.display())) {
            return Ok(Removed::Kept("the directory is not empty".into()));
        }
        let had = match leaf {
            Leaf::Dir => st.dirs.remove(&p),
            Leaf::File => st.files.remove(&p),
        };
        if had {
            st.calls.push(format!("remove {}", p.display()));
            Ok(Removed::Yes)
        } else if st.dirs.contains(&p) || st.files.contains(&p) {
            Ok(Removed::Kept("it has another type".into()))
        } else {
            Ok(Removed::Absent)
        }
    }
}

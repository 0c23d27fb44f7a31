//! An in-memory host for unit tests: devices, filesystems and a mount table
//! that behave like the kernel's in the ways the Node service relies on,
//! plus a log of every mutating call and injectable failures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::mount::MsFlags;
use nix::sys::stat::makedev;

use super::{FsStats, FsType, Host, MountEntry, MountError, MountSpec, Probe};

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

    async fn mount(&self, spec: &MountSpec) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("mount")?;
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
        st.calls.push(format!(
            "mount {} {} {} {}",
            spec.source.display(),
            spec.target.display(),
            spec.fs_type,
            spec.data.join(",")
        ));
        st.push_mount(MountEntry {
            mount_id: 0,
            parent_id: 1,
            dev: d.rdev,
            root: PathBuf::from("/"),
            mount_point: spec.target.clone(),
            mount_options: opts(spec.flags.contains(MsFlags::MS_RDONLY)),
            fs_type: spec.fs_type.clone(),
            source: spec.source.display().to_string(),
            super_options: sup,
        });
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, flags: MsFlags) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("bind")?;
        let ro = flags.contains(MsFlags::MS_RDONLY);
        st.calls.push(format!(
            "bind {} {}{}",
            source.display(),
            target.display(),
            if ro { " ro" } else { "" }
        ));
        FakeState::ensure(&mut st, source);
        if let Some(d) = st.devices.get(source).cloned() {
            st.block_binds.insert(target.to_owned(), d.rdev);
            let name = source.file_name().unwrap_or_default();
            st.push_mount(MountEntry {
                mount_id: 0,
                parent_id: 1,
                dev: makedev(0, 5),
                root: Path::new("/").join(name),
                mount_point: target.to_owned(),
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
            .find(|m| m.mount_point == source)
            .cloned()
        else {
            return Err(MountError::sys(
                format!("bind {} (fake: only mounts and devices)", source.display()),
                nix::errno::Errno::ENOENT,
            ));
        };
        st.push_mount(MountEntry {
            mount_point: target.to_owned(),
            mount_options: opts(ro),
            ..src
        });
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("unmount")?;
        if let Some(i) = st.mounts.iter().rposition(|m| m.mount_point == target) {
            st.mounts.remove(i);
            st.calls.push(format!("unmount {}", target.display()));
            if !st.mounts.iter().any(|m| m.mount_point == target) {
                st.block_binds.remove(target);
            }
        }
        Ok(())
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

    async fn set_extent_hint(&self, dir: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("set_extent_hint")?;
        st.calls.push(format!("extsize {}", dir.display()));
        Ok(())
    }

    async fn statvfs(&self, path: &Path) -> Result<FsStats, MountError> {
        let st = self.state();
        st.check("statvfs")?;
        let Some(m) = st.mounts.iter().rev().find(|m| m.mount_point == path) else {
            return Err(MountError::sys(
                format!("statvfs {}", path.display()),
                nix::errno::Errno::ENOENT,
            ));
        };
        let size = st
            .devices
            .values()
            .find(|d| d.rdev == m.dev)
            .map_or(0, |d| d.fs_size);
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
        dev: &Path,
        mountpoint: &Path,
    ) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("grow_online")?;
        st.calls.push(format!(
            "grow_online {} {} {}",
            fs.as_str(),
            dev.display(),
            mountpoint.display()
        ));
        let d = st.device(dev)?;
        d.fs_size = d.size;
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

    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("make_dir")?;
        st.dirs.insert(path.to_owned());
        Ok(())
    }

    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("make_file")?;
        st.files.insert(path.to_owned());
        Ok(())
    }

    async fn remove(&self, path: &Path) -> Result<(), MountError> {
        let mut st = self.state();
        st.check("remove")?;
        if st.mounts.iter().any(|m| m.mount_point == path) {
            return Err(MountError::sys(
                format!("remove {}", path.display()),
                nix::errno::Errno::EBUSY,
            ));
        }
        let had = st.dirs.remove(path) | st.files.remove(path);
        if had {
            st.calls.push(format!("remove {}", path.display()));
        }
        Ok(())
    }
}

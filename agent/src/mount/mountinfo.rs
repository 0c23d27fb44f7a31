//! Parser for `/proc/self/mountinfo` (proc(5)): one line per mount,
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)         (6)       (7..)   (8)(9)   (10)       (11)
//! ```
//!
//! Paths and sources have space, tab, newline and backslash escaped as
//! three-digit octal (`\040`, `\011`, `\012`, `\134`).

use std::path::PathBuf;

use super::MountError;

/// One mount as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `st_dev` of the filesystem (`makedev(major, minor)`).
    pub dev: u64,
    /// Root of the mount within its filesystem (`/` unless a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options (`dax=always`, `sunit=...`, ...).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// The mount itself is read-only.
    pub fn read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro") || self.super_options.iter().any(|o| o == "ro")
    }

    /// The filesystem runs with DAX (`dax` or `dax=always`; xfs reports
    /// `dax=never` when the device cannot do it).
    pub fn dax(&self) -> bool {
        self.super_options
            .iter()
            .any(|o| o == "dax" || o == "dax=always")
    }
}

/// Undoes the octal escapes of mountinfo fields.
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn bad(line: &str, why: &str) -> MountError {
    MountError::Parse(format!("mountinfo line {line:?}: {why}"))
}

fn num<T: std::str::FromStr>(line: &str, field: Option<&str>, what: &str) -> Result<T, MountError> {
    field
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad(line, &format!("bad {what}")))
}

/// Parses one line.
pub fn parse_line(line: &str) -> Result<MountEntry, MountError> {
    let mut it = line.split(' ');
    let mount_id = num(line, it.next(), "mount id")?;
    let parent_id = num(line, it.next(), "parent id")?;
    let (major, minor) = it
        .next()
        .and_then(|d| d.split_once(':'))
        .ok_or_else(|| bad(line, "bad major:minor"))?;
    let major: u64 = num(line, Some(major), "major")?;
    let minor: u64 = num(line, Some(minor), "minor")?;
    let root = it.next().ok_or_else(|| bad(line, "no root"))?;
    let mount_point = it.next().ok_or_else(|| bad(line, "no mount point"))?;
    let mount_options = it.next().ok_or_else(|| bad(line, "no mount options"))?;
    // Optional fields up to the lone "-".
    loop {
        match it.next() {
            Some("-") => break,
            Some(_) => {}
            None => return Err(bad(line, "no \"-\" separator")),
        }
    }
    let fs_type = it.next().ok_or_else(|| bad(line, "no filesystem type"))?;
    let source = it.next().ok_or_else(|| bad(line, "no mount source"))?;
    let super_options = it.next().unwrap_or("");
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .filter(|o| !o.is_empty())
            .map(unescape)
            .collect()
    };
    Ok(MountEntry {
        mount_id,
        parent_id,
        dev: nix::sys::stat::makedev(major, minor),
        root: PathBuf::from(unescape(root)),
        mount_point: PathBuf::from(unescape(mount_point)),
        mount_options: split(mount_options),
        fs_type: unescape(fs_type),
        source: unescape(source),
        super_options: split(super_options),
    })
}

/// Parses a whole mountinfo text, in the kernel's order (a mount stacked on
/// another comes after it).
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
27 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw,errors=remount-ro
42 27 7:3 / /tmp/my\\040dir/stage rw,relatime shared:40 - xfs /dev/loop3 rw,dax=never,inode64,sunit=4096,swidth=4096,noquota
43 27 7:3 / /tmp/my\\040dir/target ro,relatime shared:40 - xfs /dev/loop3 rw,dax=always,inode64
44 27 0:5 /loop3 /tmp/block\\011tab rw,nosuid master:2 - devtmpfs udev rw,size=4000k
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].mount_point, PathBuf::from("/proc"));
        assert_eq!(m[0].fs_type, "proc");
        let s = &m[2];
        assert_eq!(s.mount_id, 42);
        assert_eq!(s.parent_id, 27);
        assert_eq!(s.dev, nix::sys::stat::makedev(7, 3));
        assert_eq!(s.mount_point, PathBuf::from("/tmp/my dir/stage"));
        assert_eq!(s.source, "/dev/loop3");
        assert_eq!(s.fs_type, "xfs");
        assert!(!s.read_only());
        assert!(!s.dax(), "dax=never is not DAX");
        let t = &m[3];
        assert!(t.read_only());
        assert!(t.dax());
        let b = &m[4];
        assert_eq!(b.root, PathBuf::from("/loop3"));
        assert_eq!(b.mount_point, PathBuf::from("/tmp/block\ttab"));
        assert_eq!(b.dev, nix::sys::stat::makedev(0, 5));
    }

    #[test]
    fn no_optional_fields_and_bare_dax() {
        let e = parse_line("1 0 8:1 / /mnt rw - ext4 /dev/sda1 rw,dax").unwrap();
        assert!(e.dax());
        assert_eq!(e.super_options, vec!["rw", "dax"]);
    }

    #[test]
    fn unescape_handles_backslash_and_odd_input() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("new\\012line"), "new\nline");
        assert_eq!(unescape("trail\\04"), "trail\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_line("").is_err());
        assert!(parse_line("1 0 8:1 / /mnt rw shared:1 ext4 /dev/sda1 rw").is_err());
        assert!(parse_line("x 0 8:1 / /mnt rw - ext4 /dev/sda1 rw").is_err());
        assert!(parse_line("1 0 81 / /mnt rw - ext4 /dev/sda1 rw").is_err());
    }

    #[test]
    fn parses_this_machine() {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let m = parse(&text).unwrap();
        assert!(m.iter().any(|e| e.mount_point == std::path::Path::new("/")));
    }
}

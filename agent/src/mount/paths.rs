//! Checks of the paths a CO hands us before anything is mounted there:
//! absolute, no `..`, not a symlink, and (when configured) under the
//! kubelet root after resolving the symlinks of its existing ancestors.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

/// Resolves the symlinks of the longest existing prefix of `path` and
/// appends the rest. `Err` names a dangling symlink or an unreadable
/// ancestor.
pub fn resolve(path: &Path) -> Result<PathBuf, String> {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(c) => {
                let mut out = c;
                for r in rest.iter().rev() {
                    out.push(r);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if std::fs::symlink_metadata(&existing).is_ok() {
                    return Err(format!(
                        "{} is a dangling symbolic link",
                        existing.display()
                    ));
                }
                let Some(name) = existing.file_name() else {
                    return Ok(path.to_path_buf());
                };
                rest.push(name.to_owned());
                if !existing.pop() {
                    return Ok(path.to_path_buf());
                }
            }
            Err(e) => return Err(format!("cannot resolve {}: {e}", existing.display())),
        }
    }
}

/// Validates a request path and returns it with its ancestors' symlinks
/// resolved (the form mountinfo reports). `field` names it in messages.
pub fn check(field: &str, raw: &str, root: Option<&Path>) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err(format!("{field} is required"));
    }
    if raw.contains('\0') {
        return Err(format!("{field} {raw:?} contains a NUL byte"));
    }
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(format!("{field} {raw:?} must be an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{field} {raw:?} must not contain \"..\""));
    }
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!(
            "{field} {raw:?} is a symbolic link; refusing to mount over it"
        ));
    }
    let resolved = resolve(p).map_err(|e| format!("{field} {raw:?}: {e}"))?;
    if let Some(root) = root {
        let r = resolve(root).unwrap_or_else(|_| root.to_path_buf());
        if !resolved.starts_with(&r) || resolved == r {
            return Err(format!(
                "{field} {raw:?} (resolved {}) is not under the kubelet root {}",
                resolved.display(),
                root.display()
            ));
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_relative_parent_and_empty() {
        assert!(
            check("target_path", "", None)
                .unwrap_err()
                .contains("required")
        );
        let e = check("target_path", "rel/dir", None).unwrap_err();
        assert!(e.contains("target_path") && e.contains("absolute"), "{e}");
        let e = check("target_path", "/a/../b", None).unwrap_err();
        assert!(e.contains(".."), "{e}");
        assert!(
            check("target_path", "/a\0b", None)
                .unwrap_err()
                .contains("NUL")
        );
    }

    #[test]
    fn resolves_missing_tails_and_enforces_the_root() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let root = base.join("kubelet");
        std::fs::create_dir(&root).unwrap();
        let inside = root.join("pods/x/vol");
        let got = check("target_path", inside.to_str().unwrap(), Some(&root)).unwrap();
        assert_eq!(got, inside);
        let outside = base.join("elsewhere/vol");
        let e = check("target_path", outside.to_str().unwrap(), Some(&root)).unwrap_err();
        assert!(e.contains("kubelet root"), "{e}");
        // The root itself is not a volume path.
        assert!(check("target_path", root.to_str().unwrap(), Some(&root)).is_err());
        // A prefix that is not a path ancestor does not count.
        let sibling = base.join("kubelet2/x");
        assert!(check("target_path", sibling.to_str().unwrap(), Some(&root)).is_err());
    }

    #[test]
    fn symlinks_cannot_escape_the_root() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        let root = base.join("kubelet");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("pods")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An ancestor symlink pointing out of the root.
        std::os::unix::fs::symlink(&outside, root.join("pods/evil")).unwrap();
        let p = root.join("pods/evil/vol");
        let e = check("target_path", p.to_str().unwrap(), Some(&root)).unwrap_err();
        assert!(e.contains("not under"), "{e}");
        // The path itself a symlink: refused even without a root.
        std::os::unix::fs::symlink(&outside, root.join("pods/link")).unwrap();
        let e = check(
            "target_path",
            root.join("pods/link").to_str().unwrap(),
            None,
        )
        .unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A dangling ancestor symlink.
        std::os::unix::fs::symlink(base.join("nowhere"), root.join("pods/dangle")).unwrap();
        let e = check(
            "target_path",
            root.join("pods/dangle/vol").to_str().unwrap(),
            None,
        )
        .unwrap_err();
        assert!(e.contains("dangling"), "{e}");
        // A symlinked root is resolved the same way as the paths under it.
        let alias = base.join("alias");
        std::os::unix::fs::symlink(&root, &alias).unwrap();
        let got = check(
            "target_path",
            alias.join("pods/ok").to_str().unwrap(),
            Some(&alias),
        )
        .unwrap();
        assert_eq!(got, root.join("pods/ok"));
    }
}

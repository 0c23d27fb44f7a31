//! Resolution of ledger paths to the form mountinfo reports, for read-only
//! comparisons. Request paths are judged and used by `mount::confine`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_missing_tails_and_symlinked_ancestors() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("alias")).unwrap();
        assert_eq!(
            resolve(&base.join("alias/x/y")).unwrap(),
            base.join("real/x/y")
        );
        std::os::unix::fs::symlink(base.join("nowhere"), base.join("dangle")).unwrap();
        assert!(
            resolve(&base.join("dangle/x"))
                .unwrap_err()
                .contains("dangling")
        );
    }
}

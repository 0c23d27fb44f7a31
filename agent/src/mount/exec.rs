//! Subprocesses for the filesystem tools (blkid, mkfs, xfs_io, growfs,
//! e2fsck, resize2fs): an argv (never a shell), a deadline after which the
//! child is killed, the C locale so messages are stable, and stderr carried
//! into the error.

use std::process::Stdio;
use std::time::Duration;

use super::MountError;

/// Most of a tool's stderr we keep in an error message.
const STDERR_KEEP: usize = 2000;

/// What a finished command left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Shell-like rendering of an argv, for messages.
pub fn render(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"') {
                format!("{a:?}")
            } else {
                (*a).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn trimmed(s: &str) -> String {
    let t = s.trim();
    if t.len() <= STDERR_KEEP {
        return t.to_owned();
    }
    let mut end = STDERR_KEEP;
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &t[..end])
}

/// Runs `argv` to completion or until `deadline` (then kills it) and
/// returns its output whatever the exit status.
pub async fn run(argv: &[&str], deadline: Duration) -> Result<Output, MountError> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| MountError::Parse("empty command line".into()))?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| MountError::Spawn {
            argv: render(argv),
            source,
        })?;
    // On timeout the child future is dropped, which kills the process.
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| MountError::Timeout {
            argv: render(argv),
            after: deadline,
        })?
        .map_err(|source| MountError::Spawn {
            argv: render(argv),
            source,
        })?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The error for a command that exited unsuccessfully.
pub fn failed(argv: &[&str], out: &Output) -> MountError {
    let mut detail = trimmed(&out.stderr);
    if detail.is_empty() {
        detail = trimmed(&out.stdout);
    }
    MountError::Command {
        argv: render(argv),
        status: match out.code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_owned(),
        },
        stderr: detail,
    }
}

/// Runs `argv` and fails unless it exits 0.
pub async fn run_ok(argv: &[&str], deadline: Duration) -> Result<Output, MountError> {
    let out = run(argv, deadline).await?;
    if out.success() {
        Ok(out)
    } else {
        Err(failed(argv, &out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_status() {
        let out = run(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let e = run_ok(
            &["sh", "-c", "echo bad thing >&2; exit 1"],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("exit status 1"), "{e}");
        assert!(e.contains("bad thing"), "{e}");
        assert!(e.contains("sh -c"), "{e}");
    }

    #[tokio::test]
    async fn runs_in_the_c_locale() {
        let out = run(&["sh", "-c", "echo $LC_ALL"], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out.stdout.trim(), "C");
    }

    #[tokio::test]
    async fn kills_at_the_deadline() {
        let start = std::time::Instant::now();
        let e = run(&["sleep", "30"], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, MountError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let e = run(&["/nonexistent/tool"], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, MountError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/tool"), "{e}");
    }

    #[test]
    fn renders_and_trims() {
        assert_eq!(
            render(&["xfs_io", "-c", "extsize 2m", "/m"]),
            "xfs_io -c \"extsize 2m\" /m"
        );
        let long = "é".repeat(STDERR_KEEP);
        assert!(trimmed(&long).ends_with("..."));
    }
}

//! Running `lvm`: argv only (never a shell), `LC_ALL=C`, a deadline after
//! which the process is killed, stderr in the error, and the same
//! `--config` overrides on every call.

use std::fmt::Debug;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Runs one `lvm` subcommand; returns its stdout.
pub trait LvmRunner: Send + Sync + Debug {
    fn run(&self, sub: &str, args: &[&str]) -> Result<String>;
    /// Invocations so far (for measurements and metrics).
    fn invocations(&self) -> u64;
}

#[derive(Debug, Clone)]
pub struct LvmCommandConfig {
    /// Words before `lvm` (e.g. `nsenter --target 1 --mount --`), so a
    /// container can run the host's LVM in the host's mount namespace.
    pub prefix: Vec<String>,
    /// The lvm binary.
    pub lvm: String,
    /// lvm.conf overrides passed as `--config` (e.g. no udev sync where
    /// udevd is absent).
    pub config: String,
    /// No device-mapper: metadata only (`--driverloaded n`).
    pub metadata_only: bool,
    pub timeout: Duration,
}

impl Default for LvmCommandConfig {
    fn default() -> LvmCommandConfig {
        LvmCommandConfig {
            prefix: Vec::new(),
            lvm: "lvm".to_owned(),
            config: String::new(),
            metadata_only: false,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The real runner.
#[derive(Debug)]
pub struct LvmCommand {
    cfg: LvmCommandConfig,
    count: AtomicU64,
}

impl LvmCommand {
    pub fn new(cfg: LvmCommandConfig) -> LvmCommand {
        LvmCommand {
            cfg,
            count: AtomicU64::new(0),
        }
    }

    /// The full argv of a subcommand.
    pub fn argv(&self, sub: &str, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self.cfg.prefix.clone();
        v.push(self.cfg.lvm.clone());
        v.push(sub.to_owned());
        if !self.cfg.config.is_empty() {
            v.push("--config".into());
            v.push(self.cfg.config.clone());
        }
        if self.cfg.metadata_only {
            v.push("--driverloaded".into());
            v.push("n".into());
        }
        v.extend(args.iter().map(|a| (*a).to_owned()));
        v
    }
}

/// Kills the child unless it was reaped: no lvm outlives a dropped call.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

impl LvmRunner for LvmCommand {
    fn run(&self, sub: &str, args: &[&str]) -> Result<String> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let argv = self.argv(sub, args);
        let shown = argv.join(" ");
        let started = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("run {shown}"), e))?;
        let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let mut reaper = Reaper(Some(child));
        let status = loop {
            let c = reaper.0.as_mut().expect("child is reaped only here");
            match c.try_wait() {
                Ok(Some(s)) => {
                    reaper.0 = None;
                    break s;
                }
                Ok(None) if started.elapsed() > self.cfg.timeout => {
                    drop(reaper);
                    return Err(Error::Device(format!(
                        "{shown} did not finish within {:?} and was killed",
                        self.cfg.timeout
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(Error::io(format!("wait for {shown}"), e)),
            }
        };
        let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        tracing::debug!(command = %shown, ms = started.elapsed().as_millis() as u64, code = ?status.code(), "lvm command");
        if !status.success() {
            let msg: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.contains("Activation disabled"))
                .collect();
            return Err(Error::Device(format!(
                "{shown} failed ({status}): {}",
                msg.join("; ")
            )));
        }
        Ok(stdout)
    }

    fn invocations(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_carries_prefix_config_and_metadata_mode() {
        let c = LvmCommand::new(LvmCommandConfig {
            prefix: vec!["nsenter".into(), "-t1".into(), "-m".into(), "--".into()],
            config: "activation { udev_sync = 0 }".into(),
            metadata_only: true,
            ..LvmCommandConfig::default()
        });
        assert_eq!(
            c.argv("lvs", &["vg/lv"]),
            [
                "nsenter",
                "-t1",
                "-m",
                "--",
                "lvm",
                "lvs",
                "--config",
                "activation { udev_sync = 0 }",
                "--driverloaded",
                "n",
                "vg/lv"
            ]
        );
    }

    #[test]
    fn failures_carry_stderr_and_deadlines_kill() {
        let c = LvmCommand::new(LvmCommandConfig {
            lvm: "sh".into(),
            timeout: Duration::from_millis(300),
            ..LvmCommandConfig::default()
        });
        let e = c.run("-c", &["echo oops >&2; exit 3"]).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(c.run("-c", &["echo hi"]).unwrap(), "hi\n");
        let t = Instant::now();
        let e = c.run("-c", &["sleep 30"]).unwrap_err();
        assert!(e.to_string().contains("was killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(c.invocations(), 3);
    }
}

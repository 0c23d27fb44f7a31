//! One node under test: the real `pmem-agent` (and, for the remote store,
//! `pmem-allocd`) on a temporary state directory, driven over its unix
//! sockets. Dropping it kills what it started and detaches the loop devices
//! backed by files under its directory (and no others).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pmem_proto::admin::admin_client::AdminClient;
use pmem_proto::csi::identity_client::IdentityClient;
use tonic::transport::Channel;

/// How the node is set up.
#[derive(Debug, Clone)]
pub struct Spec {
    pub agent: PathBuf,
    pub allocd: PathBuf,
    pub remote: bool,
    pub loop_mode: bool,
    pub regions: u32,
    pub region_size: String,
    pub parent: PathBuf,
}

/// The durability syscalls strace counts.
pub const STRACE_FILTER: &str = "trace=fsync,fdatasync,sync_file_range,syncfs,msync";

#[derive(Debug)]
pub struct Node {
    pub spec: Spec,
    dir: tempfile::TempDir,
    agent: Option<Child>,
    allocd: Option<Child>,
    /// Under strace: where each process's summary goes.
    strace: Option<(PathBuf, PathBuf)>,
}

impl Node {
    pub fn new(spec: &Spec) -> Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix("pmem-load")
            .tempdir_in(&spec.parent)
            .context("temp dir")?;
        std::fs::create_dir_all(dir.path().join("kubelet"))?;
        Ok(Node {
            spec: spec.clone(),
            dir,
            agent: None,
            allocd: None,
            strace: None,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the ledger (and so the durability floor) lives.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    fn sock(&self, name: &str) -> String {
        format!("unix://{}", self.dir().join(name).display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("agent.log")).unwrap_or_default()
    }

    /// The tail of the daemons' log, for an error.
    pub fn log_tail(&self) -> String {
        let l = self.log();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn command(&self, bin: &Path, traced: Option<&Path>) -> Command {
        let mut cmd = match traced {
            Some(out) => {
                let mut c = Command::new("strace");
                c.args(["-f", "-c", "-e", STRACE_FILTER, "-o"])
                    .arg(out)
                    .arg("--")
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--endpoint")
            .arg(self.sock("csi.sock"))
            .arg("--admin-endpoint")
            .arg(self.sock("admin.sock"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--kubelet-root")
            .arg(self.dir().join("kubelet"))
            .args(["--node-id", "load-node", "--shutdown-timeout", "10"])
            .args(["--backend", "sim", "--sim-regions"])
            .arg(self.spec.regions.to_string())
            .arg("--sim-region-size")
            .arg(&self.spec.region_size)
            .arg("--sim-mode")
            .arg(if self.spec.loop_mode {
                "loop"
            } else {
                "file-only"
            })
            .args(["--ephemeral-collect-interval", "0"]);
        if self.spec.remote {
            cmd.arg("--allocator").arg(self.sock("allocator.sock"));
        }
        cmd
    }

    fn spawn(&self, bin: &Path, traced: Option<&Path>) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("agent.log"))?;
        self.command(bin, traced)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))
    }

    /// Runs the daemons under `strace -f -c` from the next start on.
    pub fn trace(&mut self) {
        self.strace = Some((
            self.dir().join("strace-agent.txt"),
            self.dir().join("strace-allocd.txt"),
        ));
    }

    /// The strace summaries of the last run (agent, then pmem-allocd).
    pub fn strace_outputs(&self) -> Vec<PathBuf> {
        match &self.strace {
            Some((a, b)) if self.spec.remote => vec![a.clone(), b.clone()],
            Some((a, _)) => vec![a.clone()],
            None => Vec::new(),
        }
    }

    /// Starts the daemons and returns the time from the first spawn to the
    /// first Probe that says ready.
    pub async fn start(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        if self.spec.remote {
            let out = self.strace.as_ref().map(|s| s.1.clone());
            let allocd = self.spec.allocd.clone();
            self.allocd = Some(self.spawn(&allocd, out.as_deref())?);
        }
        let out = self.strace.as_ref().map(|s| s.0.clone());
        let agent = self.spec.agent.clone();
        self.agent = Some(self.spawn(&agent, out.as_deref())?);
        let deadline = t0 + Duration::from_secs(120);
        loop {
            let mut exited = None;
            for c in [self.agent.as_mut(), self.allocd.as_mut()]
                .into_iter()
                .flatten()
            {
                exited = exited.or(c.try_wait()?);
            }
            if let Some(st) = exited {
                bail!(
                    "daemon exited with {st} at start; log:\n{}",
                    self.log_tail()
                );
            }
            if self.ready().await {
                return Ok(t0.elapsed());
            }
            if Instant::now() > deadline {
                bail!("not ready within 120 s; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn ready(&self) -> bool {
        let Ok(ch) = self.try_channel("csi.sock").await else {
            return false;
        };
        matches!(
            IdentityClient::new(ch)
                .probe(pmem_proto::csi::ProbeRequest {})
                .await,
            Ok(r) if r.get_ref().ready == Some(true)
        )
    }

    async fn try_channel(&self, name: &str) -> Result<Channel, String> {
        pmem_agent::client::connect(&self.sock(name)).await
    }

    /// A new connection to the CSI socket (one per simulated client).
    pub async fn channel(&self) -> Result<Channel> {
        self.try_channel("csi.sock")
            .await
            .map_err(anyhow::Error::msg)
    }

    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(
            self.try_channel("admin.sock")
                .await
                .map_err(anyhow::Error::msg)?,
        ))
    }

    /// SIGTERM to the agent (then pmem-allocd) and wait for both to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(c) = self.agent.take() {
            self.term(c, "pmem-agent")?;
        }
        if let Some(c) = self.allocd.take() {
            self.term(c, "pmem-allocd")?;
        }
        Ok(())
    }

    /// Stops and starts again; the time to Probe-ready of the new start.
    pub async fn restart(&mut self) -> Result<Duration> {
        self.stop()?;
        self.start().await
    }

    fn term(&self, mut c: Child, what: &str) -> Result<()> {
        // Under strace the daemon is strace's child: signal the daemon so
        // strace sees it exit and writes its summary.
        let pid = daemon_pid(&c, self.strace.is_some());
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!(
                        "{what} exited with {st} on SIGTERM; log:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                signal(pid, libc::SIGKILL);
                let _ = c.kill();
                let _ = c.wait();
                bail!("{what} did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's pid (for /proc/<pid>/status); `None` when not running.
    pub fn agent_pid(&self) -> Option<i32> {
        self.agent
            .as_ref()
            .map(|c| daemon_pid(c, self.strace.is_some()))
    }

    pub fn allocd_pid(&self) -> Option<i32> {
        self.allocd
            .as_ref()
            .map(|c| daemon_pid(c, self.strace.is_some()))
    }
}

/// The daemon's pid: the child itself, or strace's only child.
fn daemon_pid(c: &Child, traced: bool) -> i32 {
    let pid = i32::try_from(c.id()).expect("pid fits");
    if !traced {
        return pid;
    }
    // strace forks the tracee before it execs the daemon; give it a moment.
    for _ in 0..200 {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            && let Some(child) = s.split_whitespace().next().and_then(|p| p.parse().ok())
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    pid
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid of a process this harness started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Threads of a process, from /proc/<pid>/status.
pub fn threads(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// VmRSS and VmHWM of a process in bytes, from /proc/<pid>/status.
pub fn rss(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let l = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

impl Node {
    /// SIGKILL (a crash) of the daemons; the ledger recovers at the next start.
    pub fn kill(&mut self) {
        let traced = self.strace.is_some();
        for c in [self.agent.take(), self.allocd.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            // A killed strace leaves its tracee running: kill the daemon too.
            signal(daemon_pid(&c, traced), libc::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        detach_loops_under(self.dir());
    }
}

/// Detaches the loop devices whose backing file lies under `dir`: the ones
/// this node's agent made, never another's.
fn detach_loops_under(dir: &Path) {
    let Ok(canon) = dir.canonicalize() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim()).starts_with(&canon) {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{name}"))
                .stdin(Stdio::null())
                .status();
        }
    }
}

//! Test harness: runs the real `pmem-agent` binary on a temporary state
//! directory and talks to it over its unix sockets with tonic clients.
//! Everything a daemon created (loop devices over its region files, mounts
//! under its directory) is cleaned up when the harness is dropped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pmem_proto::admin::admin_client::AdminClient;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::identity_client::IdentityClient;
use pmem_proto::csi::node_client::NodeClient;
use tonic::transport::Channel;

pub mod util;

/// Path of a workspace binary. Cargo builds workspace binaries for
/// integration tests only of the same package, so build them on demand.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "pmem-agent", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build -p pmem-agent failed");
    });
    dir.join(name)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether the CSI suites run against a separate `pmem-allocd`
/// (`PMEM_TEST_ALLOCATOR=remote`) instead of the embedded allocator.
pub fn remote_allocator() -> bool {
    std::env::var("PMEM_TEST_ALLOCATOR").is_ok_and(|v| v == "remote")
}

/// One daemon on its own temp state dir (plus its pmem-allocd in remote mode).
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    pub node_id: String,
    pub allocd: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with small sim regions (2 × 1 GiB) unless `extra`
    /// overrides them, and waits until Probe says ready.
    pub async fn start(extra: &[&str]) -> Daemon {
        let mut d = Daemon::unstarted(extra);
        d.spawn().await;
        d
    }

    /// A daemon's directory and arguments, nothing spawned yet.
    pub fn unstarted(extra: &[&str]) -> Daemon {
        Daemon {
            dir: tempfile::Builder::new()
                .prefix("pmem-agent-test")
                .tempdir()
                .expect("tempdir"),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            node_id: "test-node".into(),
            allocd: None,
        }
    }

    /// The daemon's kubelet root (`--kubelet-root`), inside its temp dir,
    /// unless the test passes its own.
    pub fn kubelet_root(&self) -> PathBuf {
        match self.extra.iter().position(|a| a == "--kubelet-root") {
            Some(i) => PathBuf::from(&self.extra[i + 1]),
            None => self
                .dir
                .path()
                .canonicalize()
                .expect("temp dir")
                .join("kubelet"),
        }
    }

    /// A staging or publish path beneath the kubelet root.
    pub fn kpath(&self, rel: &str) -> PathBuf {
        self.kubelet_root().join(rel)
    }

    pub fn csi_sock(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    pub fn admin_sock(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn allocator_sock(&self) -> PathBuf {
        self.dir.path().join("allocator.sock")
    }

    pub fn command(&self) -> Command {
        let mut cmd = self.base_command("pmem-agent");
        if remote_allocator() {
            cmd.arg("--allocator")
                .arg(format!("unix://{}", self.allocator_sock().display()));
        }
        cmd
    }

    /// The allocator daemon, for remote mode.
    pub fn allocd_command(&self) -> Command {
        let mut cmd = self.base_command("pmem-allocd");
        cmd.arg("--allocator")
            .arg(format!("unix://{}", self.allocator_sock().display()));
        cmd
    }

    fn base_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin(name));
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", self.csi_sock().display()))
            .arg("--admin-endpoint")
            .arg(format!("unix://{}", self.admin_sock().display()))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--node-id")
            .arg(&self.node_id)
            .args(["--shutdown-timeout", "10"]);
        if !self.extra.iter().any(|a| a == "--sim-region-size") {
            cmd.args(["--sim-region-size", "1GiB"]);
        }
        if !self.extra.iter().any(|a| a == "--kubelet-root") {
            let root = self.kubelet_root();
            std::fs::create_dir_all(&root).expect("kubelet root");
            cmd.arg("--kubelet-root").arg(root);
        }
        cmd.args(&self.extra);
        cmd
    }

    /// (Re)starts the process (after its pmem-allocd in remote mode) and
    /// waits for readiness.
    pub async fn spawn(&mut self) {
        self.spawn_process().await;
        self.wait_ready().await;
    }

    /// Starts the process (and pmem-allocd in remote mode) without waiting
    /// for readiness: for a daemon that starts in recovery.
    pub async fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        if remote_allocator() && self.allocd.is_none() {
            let alog = log.try_clone().expect("log file");
            let child = self
                .allocd_command()
                .stdout(Stdio::null())
                .stderr(alog)
                .spawn()
                .expect("spawn pmem-allocd");
            self.allocd = Some(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(self.allocator_sock()).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "pmem-allocd not up in 30s; log:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pmem-agent");
        self.child = Some(child);
    }

    pub async fn wait_ready(&mut self) {
        self.wait_up("pmem-agent not ready", async |d: &Daemon| {
            if d.csi_sock().exists()
                && let Ok(mut c) = d.identity().await
                && let Ok(r) = c.probe(pmem_proto::csi::ProbeRequest {}).await
            {
                r.into_inner().ready == Some(true)
            } else {
                false
            }
        })
        .await;
    }

    /// Waits until the admin socket answers (the daemon may be in
    /// recovery, never ready).
    pub async fn wait_admin(&mut self) {
        self.wait_up("admin socket not up", async |d: &Daemon| {
            if d.admin_sock().exists()
                && let Ok(ch) =
                    pmem_agent::client::connect(&format!("unix://{}", d.admin_sock().display()))
                        .await
            {
                AdminClient::new(ch)
                    .ledger_status(pmem_proto::admin::Empty {})
                    .await
                    .is_ok()
            } else {
                false
            }
        })
        .await;
    }

    /// Polls `up` for 30s, failing at once when the agent exits.
    async fn wait_up(&mut self, what: &str, up: impl AsyncFn(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("pmem-agent exited early with {st}; log:\n{}", self.log());
            }
            if up(self).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} in 30s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn channel(&self) -> Result<Channel, String> {
        pmem_agent::client::connect(&format!("unix://{}", self.csi_sock().display())).await
    }

    pub async fn identity(&self) -> Result<IdentityClient<Channel>, String> {
        Ok(IdentityClient::new(self.channel().await?))
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await.expect("connect csi"))
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await.expect("connect csi"))
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        let ch = pmem_agent::client::connect(&format!("unix://{}", self.admin_sock().display()))
            .await
            .expect("connect admin");
        AdminClient::new(ch)
    }

    /// SIGTERM and wait; returns the agent's exit status. In remote mode
    /// the allocator daemon is stopped too and must exit cleanly.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let st = Self::term(self.child.take().expect("daemon running"), &self.log());
        if let Some(a) = self.allocd.take() {
            let ast = Self::term(a, &self.log());
            assert!(
                ast.success(),
                "pmem-allocd exit {ast}; log:\n{}",
                self.log()
            );
        }
        st
    }

    fn term(mut c: Child, log: &str) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not exit within 20s of SIGTERM; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash) of the agent and, in remote mode, the allocator.
    pub fn kill(&mut self) {
        for c in [self.child.take(), self.allocd.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Unmounts everything under `dir` and detaches loop devices backed by files
/// under it. Tests share the machine: only what lives under `dir` is touched.
pub fn cleanup_dir(dir: &Path) {
    let Ok(canon) = dir.canonicalize() else {
        return;
    };
    let prefix = canon.display().to_string();
    // Unmount deepest first.
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if backing.trim().starts_with(&prefix) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{name}"))
                    .status();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        cleanup_dir(self.dir.path());
    }
}

//! The container image (#15). Always: the runtime package list that the
//! Containerfile and scripts/image share, and the agent's no-shell rule.
//! Given the OCI archive scripts/image built (PMEM_IMAGE_ARCHIVE, which
//! .ci/run sets), `image_runs_like_the_daemonset` runs that image the way
//! the DaemonSet does and drives CSI through its socket from the host.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::util::{free_port, mount_cap, mounts, s};
use nix::mount::{MsFlags, mount};
use pmem_proto::csi;
use pmem_proto::csi::controller_client::ControllerClient;
use pmem_proto::csi::identity_client::IdentityClient;
use pmem_proto::csi::node_client::NodeClient;
use serde_json::Value;
use tonic::transport::Channel;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// deploy/image/packages.txt: (installed, removed again afterwards).
fn package_list() -> (Vec<String>, Vec<String>) {
    let mut install = Vec::new();
    let mut purge = Vec::new();
    for line in read("deploy/image/packages.txt").lines() {
        let name: String = line
            .split('#')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        match name.strip_prefix('-') {
            Some(p) => purge.push(p.to_owned()),
            None if !name.is_empty() => install.push(name),
            None => {}
        }
    }
    (install, purge)
}

/// The programs the agent and its backends run, and the package that ships
/// each in Debian.
const PROGRAMS: &[(&str, &str)] = &[
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("blkid", "util-linux"),
    ("lvm", "lvm2"),
];

/// Non-test Rust sources of the crates that go into the image.
fn product_sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if name != "tests" {
                    walk(&p, out);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" {
                let text = std::fs::read_to_string(&p).unwrap();
                // Unit tests sit in a trailing #[cfg(test)] module.
                let text = match text.find("#[cfg(test)]") {
                    Some(i) => text[..i].to_owned(),
                    None => text,
                };
                out.push((p, text));
            }
        }
    }
    let mut out = Vec::new();
    for c in ["agent/src", "allocator/src", "proto/src"] {
        walk(&repo().join(c), &mut out);
    }
    out
}

/// The `sed` programs a file applies to deploy/image/packages.txt.
fn package_list_parsers(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.contains("packages.txt") && l.contains("sed '"))
        .map(|l| {
            let start = l.find("sed '").unwrap() + 5;
            let len = l[start..].find('\'').expect("closing quote");
            l[start..start + len].to_owned()
        })
        .collect()
}

#[test]
fn image_package_list_is_the_one_both_builds_install() {
    let (install, purge) = package_list();
    assert!(!install.is_empty(), "packages.txt installs nothing");
    let all: BTreeSet<_> = install.iter().chain(&purge).collect();
    assert_eq!(all.len(), install.len() + purge.len(), "a package twice");
    for (prog, pkg) in PROGRAMS {
        assert!(
            install.iter().any(|p| p == pkg),
            "{prog} comes from {pkg}, which packages.txt does not install"
        );
        assert!(
            product_sources()
                .iter()
                .any(|(_, t)| t.contains(&format!("\"{prog}\""))),
            "the table names {prog}, which no source runs any more"
        );
    }

    let containerfile = read("Containerfile");
    let script = read("scripts/image");
    // The Containerfile's runtime stage installs the list and nothing else.
    let runtime = &containerfile[containerfile.rfind("\nFROM ").expect("FROM")..];
    assert!(
        runtime.contains("COPY deploy/image/packages.txt "),
        "{runtime}"
    );
    assert!(
        runtime.contains("COPY deploy/image/dpkg-nodoc "),
        "{runtime}"
    );
    assert_eq!(runtime.matches("apt-get install").count(), 1, "{runtime}");
    assert!(runtime.contains("xargs apt-get install"), "{runtime}");
    assert!(script.contains("deploy/image/packages.txt"));
    assert!(script.contains("deploy/image/dpkg-nodoc"));
    // Both read the list with the same parsers: one for what is installed,
    // one for what is removed again.
    let a = package_list_parsers(&containerfile);
    let b = package_list_parsers(&script);
    assert_eq!(a.len(), 2, "Containerfile parsers: {a:?}");
    assert_eq!(
        a, b,
        "the Containerfile and scripts/image read packages.txt differently"
    );
    // Neither names an image package on its own.
    for pkg in &install {
        let inline = format!(" {pkg} ");
        assert!(
            !runtime.contains(&inline),
            "Containerfile installs {pkg} inline"
        );
        assert!(
            !script.contains(&inline),
            "scripts/image installs {pkg} inline"
        );
    }
    // The entrypoint.
    assert!(runtime.contains("ENTRYPOINT [\"/usr/bin/pmem-agent\"]"));
    assert!(script.contains("--config.entrypoint /usr/bin/pmem-agent"));
}

#[test]
fn image_agent_never_executes_a_shell() {
    let shells = [
        "\"sh\"",
        "\"/bin/sh\"",
        "\"bash\"",
        "\"/bin/bash\"",
        "\"dash\"",
    ];
    let mut found = Vec::new();
    for (path, text) in product_sources() {
        for sh in shells {
            if text.contains(sh) {
                found.push(format!("{} names {sh}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

// ---------------------------------------------------------------------------
// The image itself.

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn blob(oci: &Path, digest: &str) -> PathBuf {
    oci.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").expect("sha256 digest"))
}

/// Everything the test mounted and every loop device over its sim regions
/// goes when it ends, passed or not.
struct Cleanup {
    dir: PathBuf,
    agent: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach_loops_over(&self.dir.join("state"));
        common::cleanup_dir(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loop devices whose backing file is one of the files under `dir` (matched
/// by device and inode: inside the container the path differs).
fn detach_loops_over(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut files = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let dev = m.dev();
                files.insert((
                    format!(
                        "{}:{}",
                        nix::sys::stat::major(dev),
                        nix::sys::stat::minor(dev)
                    ),
                    m.ino().to_string(),
                ));
            }
        }
    }
    let Ok(out) = Command::new("losetup")
        .args([
            "--list",
            "--noheadings",
            "--raw",
            "-O",
            "NAME,BACK-MAJ:MIN,BACK-INO",
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && files.contains(&(f[1].to_owned(), f[2].to_owned())) {
            let _ = Command::new("losetup").args(["-d", f[0]]).status();
        }
    }
}

fn bind(src: &Path, dst: &Path, recursive: bool) {
    std::fs::create_dir_all(dst).unwrap();
    let flags = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(Some(src), dst, None::<&str>, flags, None::<&str>)
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", src.display(), dst.display()));
}

fn propagation(dst: &Path, flag: MsFlags) {
    mount(None::<&str>, dst, None::<&str>, flag, None::<&str>)
        .unwrap_or_else(|e| panic!("propagation {flag:?} of {}: {e}", dst.display()));
}

fn is_mountpoint(p: &Path) -> bool {
    let p = s(p);
    mounts().iter().any(|m| s(&m.mount_point) == p)
}

async fn channel(sock: &Path) -> Result<Channel, String> {
    pmem_agent::client::connect(&format!("unix://{}", sock.display())).await
}

/// The sim overlay's agent arguments, with this test's node id, kubelet
/// root, metrics address and smaller regions.
fn daemonset_sim_args(kubelet: &Path, metrics_port: u16) -> Vec<String> {
    let text = read("deploy/overlays/sim/backend.yaml");
    let doc: Value = serde_norway::from_str(&text).expect("backend.yaml");
    let containers = doc["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let agent = containers
        .iter()
        .find(|c| c["name"] == "pmem-agent")
        .expect("pmem-agent container");
    let mut args: Vec<String> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let set = |args: &mut Vec<String>, flag: &str, value: String| {
        let prefix = format!("{flag}=");
        let i = args
            .iter()
            .position(|a| a.starts_with(&prefix))
            .unwrap_or_else(|| panic!("the sim overlay passes no {flag}"));
        args[i] = format!("{prefix}{value}");
    };
    set(&mut args, "--node-id", "image-node".into());
    set(&mut args, "--kubelet-root", s(kubelet));
    set(
        &mut args,
        "--metrics-address",
        format!("127.0.0.1:{metrics_port}"),
    );
    set(&mut args, "--sim-region-size", "1GiB".into());
    assert!(
        args.iter().any(|a| a == "--endpoint=unix:///csi/csi.sock"),
        "{args:?}"
    );
    args.push("--shutdown-timeout=10".into());
    args
}

/// The host pid of the agent: the child `unshare --fork` made.
fn agent_pid(unshare: &Child) -> nix::unistd::Pid {
    let pid = unshare.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return nix::unistd::Pid::from_raw(c.parse().unwrap());
        }
        assert!(Instant::now() < deadline, "unshare forked no agent");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
#[ignore = "needs the OCI archive of scripts/image in PMEM_IMAGE_ARCHIVE and root; .ci/run runs it"]
async fn image_runs_like_the_daemonset() {
    let archive = PathBuf::from(
        std::env::var("PMEM_IMAGE_ARCHIVE")
            .expect("PMEM_IMAGE_ARCHIVE: the archive scripts/image printed"),
    );
    assert!(
        common::is_root(),
        "the image test runs as root (mounts, loop devices)"
    );
    let dir = tempfile::Builder::new()
        .prefix("pmem-image-test")
        .tempdir()
        .unwrap()
        .keep()
        .canonicalize()
        .unwrap();
    let mut guard = Cleanup {
        dir: dir.clone(),
        agent: None,
    };

    // Unpack the OCI archive: index -> manifest -> config and layers.
    let oci = dir.join("oci");
    std::fs::create_dir_all(&oci).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&oci));
    let index = json(&oci.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let tag = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"], tag,
        "{index}"
    );
    let manifest = json(&blob(&oci, manifests[0]["digest"].as_str().unwrap()));
    let config = json(&blob(&oci, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/bin/pmem-agent"]),
        "{config}"
    );
    let labels = &config["config"]["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .expect("revision label");
    let head = run(Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["rev-parse", "HEAD"]));
    assert!(
        revision.starts_with(head.trim()),
        "image built from {revision}, this checkout is {head}"
    );
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for layer in manifest["layers"].as_array().expect("layers") {
        run(Command::new("tar")
            .args(["--numeric-owner", "-xzf"])
            .arg(blob(&oci, layer["digest"].as_str().unwrap()))
            .arg("-C")
            .arg(&rootfs));
    }

    // The SBOM-style list: every package of the list, none removed again,
    // and every program the agent runs in the image.
    let sbom = std::fs::read_to_string(rootfs.join("usr/share/pmem-agent/packages.tsv"))
        .expect("the image's package list");
    let installed: BTreeMap<&str, &str> = sbom
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?, f.next()?))
        })
        .collect();
    let (install, purge) = package_list();
    for p in &install {
        assert!(
            installed.contains_key(p.as_str()),
            "{p} missing from\n{sbom}"
        );
    }
    for p in &purge {
        assert!(
            !installed.contains_key(p.as_str()),
            "{p} still in the image"
        );
    }
    for (prog, _) in PROGRAMS {
        assert!(
            ["usr/sbin", "usr/bin"]
                .iter()
                .any(|d| rootfs.join(d).join(prog).is_file()),
            "{prog} is not in the image"
        );
    }
    // Proof by behaviour that the agent runs no shell: none can start here.
    for sh in ["usr/bin/dash", "usr/bin/bash"] {
        let p = rootfs.join(sh);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }

    // The node's directories, as the DaemonSet's hostPath volumes see them.
    let kubelet = dir.join("kubelet");
    let csi_dir = dir.join("csi");
    let admin_dir = dir.join("admin");
    let state = dir.join("state");
    for d in [&kubelet, &csi_dir, &admin_dir, &state] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The kubelet directory is a shared mount, as on a node; the rootfs a
    // private one, so nothing bound into it leaks out.
    bind(&kubelet, &kubelet, false);
    propagation(&kubelet, MsFlags::MS_SHARED);
    bind(&rootfs, &rootfs, false);
    propagation(&rootfs, MsFlags::MS_PRIVATE);
    let inside = |p: &str| rootfs.join(p.trim_start_matches('/'));
    bind(&csi_dir, &inside("/csi"), false);
    bind(&admin_dir, &inside("/run/pmem-agent"), false);
    bind(&state, &inside("/var/lib/pmem-agent"), false);
    // mountPropagation: Bidirectional (rshared): the bind joins the host's
    // peer group, so what the agent mounts beneath it reaches the host.
    bind(&kubelet, &inside(&s(&kubelet)), true);
    propagation(&inside(&s(&kubelet)), MsFlags::MS_SHARED | MsFlags::MS_REC);
    bind(Path::new("/dev"), &inside("/dev"), true);
    bind(Path::new("/sys"), &inside("/sys"), true);

    // Nested container runtimes need a cgroup setup this kind of CI host
    // (a container itself, hybrid cgroups) lacks, so the image runs as its
    // unpacked rootfs under unshare + chroot with the DaemonSet's binds.
    println!("image test runtime: unshare (mount + pid namespaces) + chroot into the image rootfs");
    let port = free_port();
    let args = daemonset_sim_args(&kubelet, port);
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "unchanged",
            "--mount-proc",
        ])
        .arg(format!("--root={}", rootfs.display()))
        .arg("--wd=/")
        .arg(config["config"]["Entrypoint"][0].as_str().unwrap())
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NODE_NAME", "image-node")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("unshare");
    guard.agent = Some(child);
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let sock = csi_dir.join("csi.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(st)) = guard.agent.as_mut().unwrap().try_wait() {
            panic!("the image's agent exited with {st}; log:\n{}", agent_log());
        }
        if let Ok(ch) = channel(&sock).await
            && let Ok(r) = IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
            && r.into_inner().ready == Some(true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready in 60 s; log:\n{}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ch = channel(&sock).await.unwrap();
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "image-node");
    let cap = ctl
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap.available_capacity, 2 << 30, "{cap:?}");

    // A PVC's life: create, stage, publish into two pods, unpublish, unstage,
    // delete.
    let xfs = mount_cap("xfs", &[]);
    let vol = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "pvc-image".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![xfs.clone()],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}; log:\n{}", agent_log()))
        .into_inner()
        .volume
        .expect("volume");
    let id = vol.volume_id.clone();
    let staging = kubelet.join("plugins/kubernetes.io/csi/pmem-agent.csi/pv-image/globalmount");
    std::fs::create_dir_all(&staging).unwrap();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: s(&staging),
        volume_capability: Some(xfs.clone()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}; log:\n{}", agent_log()));
    assert!(
        is_mountpoint(&staging),
        "the staging mount did not reach the host"
    );
    let targets: Vec<PathBuf> = ["pod-a", "pod-b"]
        .iter()
        .map(|pod| {
            let t = kubelet.join(format!(
                "pods/{pod}/volumes/kubernetes.io~csi/pv-image/mount"
            ));
            std::fs::create_dir_all(t.parent().unwrap()).unwrap();
            t
        })
        .collect();
    for t in &targets {
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: s(&staging),
            target_path: s(t),
            volume_capability: Some(xfs.clone()),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("publish: {e}; log:\n{}", agent_log()));
        assert!(is_mountpoint(t), "{} is no mount on the host", t.display());
    }
    // Written on the host through one pod's path, read through the other's:
    // both are the volume.
    std::fs::write(targets[0].join("hello"), b"from the host").unwrap();
    assert_eq!(
        std::fs::read(targets[1].join("hello")).unwrap(),
        b"from the host"
    );
    for t in &targets {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: s(t),
        })
        .await
        .unwrap();
        assert!(!is_mountpoint(t), "{} still mounted", t.display());
    }
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: s(&staging),
    })
    .await
    .unwrap();
    assert!(!is_mountpoint(&staging));
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // A CSI ephemeral inline volume.
    let eph = kubelet.join("pods/pod-c/volumes/kubernetes.io~csi/scratch/mount");
    std::fs::create_dir_all(eph.parent().unwrap()).unwrap();
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: "csi-image-ephemeral".into(),
        target_path: s(&eph),
        volume_capability: Some(xfs.clone()),
        volume_context: [
            ("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned()),
            ("size".to_owned(), "64Mi".to_owned()),
        ]
        .into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("ephemeral publish: {e}; log:\n{}", agent_log()));
    assert!(is_mountpoint(&eph));
    std::fs::write(eph.join("scratch"), b"ephemeral").unwrap();
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "csi-image-ephemeral".into(),
        target_path: s(&eph),
    })
    .await
    .unwrap();
    assert!(!is_mountpoint(&eph));

    // /metrics, on the address the agent was given.
    let page = common::util::scrape(port).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(
        common::util::sample(&page, "pmem_agent_region_size_bytes{region=\"region0\"}"),
        f64::from(1u32 << 30),
        "{page}"
    );
    assert!(page.contains("csi_plugin_operations_seconds"), "{page}");

    // The image's own pmemctl, as `kubectl exec` would run it: the
    // container's filesystem, the admin socket at its default path.
    let ctl_out = run(Command::new("chroot")
        .arg(&rootfs)
        .args([
            "/usr/bin/pmemctl",
            "--endpoint",
            "unix:///csi/csi.sock",
            "identity",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin"));
    assert!(
        ctl_out.contains("pmem-agent.csi"),
        "pmemctl identity: {ctl_out}"
    );
    let regions = run(Command::new("chroot")
        .arg(&rootfs)
        .args(["/usr/bin/pmemctl", "regions"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin"));
    assert!(
        regions.contains("region0") && regions.contains("region1"),
        "{regions}"
    );

    // SIGTERM, as the kubelet stops the pod: a clean exit.
    let unshare = guard.agent.take().unwrap();
    nix::sys::signal::kill(agent_pid(&unshare), nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut unshare = unshare;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = unshare.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = unshare.kill();
            panic!("no exit within 30 s of SIGTERM; log:\n{}", agent_log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status}; log:\n{}", agent_log());
    assert!(!agent_log().contains("panicked"), "{}", agent_log());
    drop(guard);
}

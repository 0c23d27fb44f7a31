//! The sockets against clients the usual tonic client never shows: any
//! `:authority` (a raw HTTP/2 client sending the bare socket path as grpc-go
//! does, and Python grpcio with its default options driving every CSI
//! call), a closed stderr, and world-accessible socket modes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::util::{block_cap, free_port, sample, scrape};
use common::{Daemon, bin};
use loona_hpack::{Decoder, Encoder};
use pmem_proto::{admin, csi};
use prost::Message;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// How a request's header block is framed and delivered.
#[derive(Debug, Default)]
struct Shape {
    /// A dynamic table size update at the start of the block.
    resize: Option<usize>,
    extra: Vec<(String, String)>,
    /// Padding bytes on the HEADERS frame (0: not PADDED).
    pad: u8,
    priority: bool,
    /// Fragments: HEADERS plus `pieces - 1` CONTINUATION frames.
    pieces: usize,
    /// Written one byte per write(2).
    bytewise: bool,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    v.push(kind);
    v.push(flags);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// How the server answered one request.
#[derive(Debug)]
enum Answer {
    Grpc {
        headers: Fields,
        message: Vec<u8>,
        trailers: Fields,
    },
    Reset(u32),
    GoAway(u32),
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

/// A minimal HTTP/2 gRPC client written here: HPACK from loona-hpack (its
/// encoder indexes, so the server's decoder state is exercised across
/// requests), frames by hand, one request at a time.
struct RawClient {
    sock: UnixStream,
    enc: Encoder<'static>,
    dec: Decoder<'static>,
    next_stream: u32,
    authority: String,
}

impl RawClient {
    fn connect(path: &Path, authority: &str) -> RawClient {
        let mut sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        sock.write_all(PREFACE).unwrap();
        sock.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        RawClient {
            sock,
            enc: Encoder::new(),
            dec: Decoder::new(),
            next_stream: 1,
            authority: authority.to_owned(),
        }
    }

    fn read_frame(&mut self) -> (u8, u8, u32, Vec<u8>) {
        let mut h = [0u8; 9];
        self.sock.read_exact(&mut h).expect("read frame header");
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let mut p = vec![0; len];
        self.sock.read_exact(&mut p).expect("read frame payload");
        (h[3], h[4], stream, p)
    }

    fn call(&mut self, path: &str, request: &[u8]) -> Answer {
        self.call_shaped(path, request, &Shape::default())
    }

    /// A request whose header block is framed as `shape` says.
    fn call_shaped(&mut self, path: &str, request: &[u8], shape: &Shape) -> Answer {
        let stream = self.next_stream;
        self.next_stream += 2;
        let mut headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", self.authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"grpc-go/1.25.0 (hostile_transport)"),
        ];
        for (n, v) in &shape.extra {
            headers.push((n.as_bytes(), v.as_bytes()));
        }
        let mut block = Vec::new();
        if let Some(size) = shape.resize {
            // A dynamic table size update opens the block (RFC 7541 §4.2).
            loona_hpack::encoder::encode_integer_into(size, 5, 0x20, &mut block).unwrap();
            self.enc.set_max_table_size(size);
        }
        self.enc.encode_into(headers, &mut block).unwrap();
        let pieces = shape.pieces.max(1);
        let step = block.len().div_ceil(pieces);
        let mut fragments: Vec<&[u8]> = block.chunks(step).collect();
        fragments.resize(pieces, &[]);
        let mut bytes = Vec::new();
        for (i, frag) in fragments.iter().enumerate() {
            let last = i + 1 == fragments.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            let mut payload = Vec::new();
            let kind = if i == 0 {
                if shape.pad > 0 {
                    flags |= PADDED;
                    payload.push(shape.pad);
                }
                if shape.priority {
                    flags |= PRIORITY;
                    payload.extend_from_slice(&[0, 0, 0, 0, 15]);
                }
                HEADERS
            } else {
                CONTINUATION
            };
            payload.extend_from_slice(frag);
            if i == 0 {
                payload.extend(std::iter::repeat_n(0, usize::from(shape.pad)));
            }
            bytes.extend_from_slice(&frame(kind, flags, stream, &payload));
        }
        let mut msg = vec![0];
        msg.extend_from_slice(&u32::try_from(request.len()).unwrap().to_be_bytes());
        msg.extend_from_slice(request);
        bytes.extend_from_slice(&frame(DATA, END_STREAM, stream, &msg));
        if shape.bytewise {
            for b in &bytes {
                self.sock.write_all(std::slice::from_ref(b)).unwrap();
            }
        } else {
            self.sock.write_all(&bytes).unwrap();
        }

        let mut blocks: Vec<Fields> = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut data = Vec::new();
        loop {
            let (kind, flags, s, payload) = self.read_frame();
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    self.sock.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
                }
                GOAWAY => {
                    return Answer::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                RST_STREAM if s == stream => {
                    return Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                DATA if s == stream => data.extend_from_slice(&payload),
                HEADERS | CONTINUATION if s == stream => {
                    // The server sends neither padding nor priority.
                    pending.extend_from_slice(&payload);
                    if flags & END_HEADERS != 0 {
                        blocks.push(self.dec.decode(&pending).expect("decode response headers"));
                        pending.clear();
                    }
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        let trailers = blocks.pop().expect("trailers");
        let headers = if blocks.is_empty() {
            // Trailers-only answer.
            trailers.clone()
        } else {
            blocks.remove(0)
        };
        let message = if data.len() >= 5 {
            data[5..].to_vec()
        } else {
            Vec::new()
        };
        Answer::Grpc {
            headers,
            message,
            trailers,
        }
    }

    /// A call that must succeed; returns the response message.
    fn ok(&mut self, path: &str, request: &[u8]) -> Vec<u8> {
        match self.call(path, request) {
            Answer::Grpc {
                headers,
                message,
                trailers,
            } => {
                assert_eq!(field(&headers, ":status"), Some("200"), "{path}");
                assert_eq!(
                    field(&trailers, "grpc-status"),
                    Some("0"),
                    "{path}: {:?}",
                    field(&trailers, "grpc-message")
                );
                message
            }
            Answer::Reset(code) => panic!(
                "{path}: stream reset with HTTP/2 error code {code} (authority {:?})",
                self.authority
            ),
            Answer::GoAway(code) => panic!(
                "{path}: connection closed with GOAWAY code {code} (authority {:?})",
                self.authority
            ),
        }
    }
}

fn probe(c: &mut RawClient) -> csi::ProbeResponse {
    let m = c.ok(
        "/csi.v1.Identity/Probe",
        &csi::ProbeRequest {}.encode_to_vec(),
    );
    csi::ProbeResponse::decode(&m[..]).unwrap()
}

fn node_info(c: &mut RawClient) -> csi::NodeGetInfoResponse {
    let m = c.ok(
        "/csi.v1.Node/NodeGetInfo",
        &csi::NodeGetInfoRequest {}.encode_to_vec(),
    );
    csi::NodeGetInfoResponse::decode(&m[..]).unwrap()
}

/// grpc-go dialing a bare path (kubelets before 1.26) and C-core send the
/// socket path as `:authority`; h2 alone resets those streams.
#[tokio::test]
async fn hostile_bare_path_authority_gets_answers_on_every_socket() {
    let d = Daemon::start(&["--sim-mode", "file-only"]).await;
    let csi_path = d.csi_sock().display().to_string();
    for authority in [
        csi_path.clone(),
        format!("unix:{csi_path}"),
        "%2Ftmp%2Fcsi.sock".to_owned(),
        "localhost".to_owned(),
    ] {
        let mut c = RawClient::connect(&d.csi_sock(), &authority);
        // Many requests on one connection: the server's HPACK state
        // must follow this client's dynamic table.
        for _ in 0..60 {
            assert_eq!(probe(&mut c).ready, Some(true), "{authority}");
            assert_eq!(node_info(&mut c).node_id, d.node_id, "{authority}");
        }
        // A client mistake still comes back as a gRPC status.
        match c.call(
            "/csi.v1.Controller/DeleteVolume",
            &csi::DeleteVolumeRequest::default().encode_to_vec(),
        ) {
            Answer::Grpc { trailers, .. } => {
                assert_eq!(field(&trailers, "grpc-status"), Some("3"), "{trailers:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    // Header blocks the way other clients frame them: split into
    // CONTINUATIONs, padded, with priority, table size changes, one byte
    // per write; then blocks too large for hyper's 16 KiB header list
    // limit (our re-encoded block spans a CONTINUATION): refused on that
    // stream only, the connection goes on.
    let mut c = RawClient::connect(&d.csi_sock(), &csi_path);
    for i in 0..40usize {
        let shape = Shape {
            resize: match i % 10 {
                3 => Some(0),
                4 => Some(512),
                7 => Some(4096),
                _ => None,
            },
            extra: vec![("x-call".into(), format!("{i}"))],
            pad: u8::try_from(i % 3 * 7).unwrap(),
            priority: i % 2 == 1,
            pieces: 1 + i % 4,
            bytewise: i % 5 == 0,
        };
        let m = match c.call_shaped(
            "/csi.v1.Identity/Probe",
            &csi::ProbeRequest {}.encode_to_vec(),
            &shape,
        ) {
            Answer::Grpc {
                message, trailers, ..
            } => {
                assert_eq!(field(&trailers, "grpc-status"), Some("0"), "{shape:?}");
                message
            }
            other => panic!("{shape:?}: {other:?}"),
        };
        assert_eq!(
            csi::ProbeResponse::decode(&m[..]).unwrap().ready,
            Some(true)
        );
        if i % 8 == 0 {
            let big = Shape {
                extra: vec![("x-big".into(), "b".repeat(20_000))],
                pieces: 3,
                ..Shape::default()
            };
            match c.call_shaped(
                "/csi.v1.Identity/Probe",
                &csi::ProbeRequest {}.encode_to_vec(),
                &big,
            ) {
                Answer::Grpc { headers, .. } => {
                    assert_ne!(field(&headers, ":status"), Some("200"), "{headers:?}")
                }
                Answer::Reset(_) => {}
                Answer::GoAway(code) => panic!("connection lost for one large block: {code}"),
            }
        }
    }
    let admin_path = d.admin_sock().display().to_string();
    let mut a = RawClient::connect(&d.admin_sock(), &admin_path);
    let m = a.ok(
        "/pmem.admin.v1.Admin/ListRegions",
        &admin::ListRegionsRequest::default().encode_to_vec(),
    );
    assert_eq!(
        admin::ListRegionsResponse::decode(&m[..])
            .unwrap()
            .regions
            .len(),
        2
    );
}

/// pmem-allocd's allocator socket, and pmem-agent in front of it.
#[tokio::test]
async fn hostile_bare_path_authority_on_the_allocator_socket() {
    let mut d = Daemon::unstarted(&["--sim-mode", "file-only"]);
    // Held by the harness, so a failing test still kills it.
    d.allocd = Some(
        d.allocd_command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = d.allocator_sock();
    let mut tries = 0;
    while UnixStream::connect(&sock).is_err() {
        tries += 1;
        assert!(tries < 600, "pmem-allocd did not come up");
        let exited = d.allocd.as_mut().unwrap().try_wait().unwrap();
        assert!(exited.is_none(), "pmem-allocd exited: {exited:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = RawClient::connect(&sock, &sock.display().to_string());
    for _ in 0..20 {
        let m = c.ok(
            "/pmem.admin.v1.Allocator/Health",
            &admin::Empty::default().encode_to_vec(),
        );
        admin::HealthResponse::decode(&m[..]).unwrap();
    }
}

/// A process the test spawned itself, killed if the test fails first.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("PMEM_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pmem-agent-test/venv"));
    let py = venv.join("bin/python");
    // A missing venv is a failure, never a skip: scripts/test (through
    // scripts/setup-debian) creates it.
    assert!(
        py.exists(),
        "no Python venv with grpcio at {} (scripts/setup-debian creates it; PMEM_TEST_VENV overrides)",
        venv.display()
    );
    py
}

/// Python grpcio from PyPI, default options (its C-core sends the socket
/// path as `:authority`): every Identity, Controller and Node call, with
/// real loop devices, mkfs and mounts.
#[tokio::test]
async fn hostile_grpcio_with_default_options_drives_every_csi_call() {
    let python = venv_python();
    let d = Daemon::start(&[]).await;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kubelet = d.dir.path().canonicalize().unwrap().join("kubelet");
    let sock = d.csi_sock();
    let node_id = d.node_id.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(repo.join("tests/python/csi_grpcio.py"))
            .arg(repo.join("proto"))
            .arg(&sock)
            .arg(&kubelet)
            .arg(&node_id)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "grpcio client failed ({}):\n{stdout}\n{stderr}\nagent log:\n{}",
        out.status,
        d.log()
    );
    assert!(stdout.contains("calls answered as expected"), "{stdout}");
    for m in [
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeUnstageVolume",
        "ListVolumes",
        "GetCapacity",
        "DeleteVolume",
    ] {
        assert!(
            stdout.contains(&format!("ok {m}")),
            "{m} missing:\n{stdout}"
        );
    }
}

/// Spawns `cmd` with stderr on a pipe, reads until a line containing
/// `ready`, then closes the read end.
fn spawn_then_close_stderr(mut cmd: Command, ready: &str) -> std::process::Child {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "stderr ended before {ready:?}:\n{seen}");
        seen.push_str(&line);
        if line.contains(ready) {
            break;
        }
    }
    drop(err);
    child
}

async fn drive_calls(d: &Daemon) {
    let mut id = d.identity().await.unwrap();
    let mut c = d.controller().await;
    for i in 0..5 {
        let r = id.probe(csi::ProbeRequest {}).await.expect("probe");
        assert_eq!(r.into_inner().ready, Some(true));
        let v = c
            .create_volume(csi::CreateVolumeRequest {
                name: format!("stderr-{i}"),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 16 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_cap()],
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner()
            .volume
            .unwrap();
        // A client mistake: logged at warn.
        let e = c
            .delete_volume(csi::DeleteVolumeRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete");
    }
}

/// The reader of the agent's stderr goes away: calls keep working, the
/// dropped log lines are counted, SIGTERM exits 0.
#[tokio::test]
async fn hostile_stderr_closed_calls_work_and_sigterm_exits_0() {
    let port = free_port();
    let mut d = Daemon::unstarted(&[
        "--sim-mode",
        "file-only",
        "--metrics-address",
        &format!("127.0.0.1:{port}"),
    ]);
    if common::remote_allocator() {
        d.allocd = Some(spawn_then_close_stderr(
            d.allocd_command(),
            "pmem-allocd ready",
        ));
    }
    d.child = Some(spawn_then_close_stderr(d.command(), "pmem-agent ready"));
    d.wait_ready().await;
    drive_calls(&d).await;
    let text = scrape(port).await;
    assert!(
        sample(&text, "pmem_agent_log_write_errors_total") >= 10.0,
        "{text}"
    );
    let st = d.stop();
    assert!(
        st.success(),
        "exit status {st} after SIGTERM with stderr closed"
    );
}

/// The same for pmem-allocd (it shares the logging code) behind an agent
/// whose stderr is closed too.
#[tokio::test]
async fn hostile_stderr_closed_pmem_allocd_keeps_serving_and_exits_0() {
    // JSON logs here, text in the test above: both formats go through the sink.
    let mut d = Daemon::unstarted(&["--sim-mode", "file-only", "--log-format", "json"]);
    d.allocd = Some(spawn_then_close_stderr(
        d.allocd_command(),
        "pmem-allocd ready",
    ));
    let mut agent = Command::new(bin("pmem-agent"));
    let base: Vec<_> = d.command().get_args().map(|a| a.to_owned()).collect();
    agent.args(&base);
    if !base.iter().any(|a| a == "--allocator") {
        agent
            .arg("--allocator")
            .arg(format!("unix://{}", d.allocator_sock().display()));
    }
    d.child = Some(spawn_then_close_stderr(agent, "pmem-agent ready"));
    d.wait_ready().await;
    drive_calls(&d).await;
    // stop() asserts that pmem-allocd exits 0 too.
    let st = d.stop();
    assert!(
        st.success(),
        "exit status {st} after SIGTERM with stderr closed"
    );
}

/// Other bits on the socket mode: refused at start with a clear message;
/// accepted with --allow-world-socket (flag or environment) and a warning.
#[tokio::test]
async fn hostile_world_accessible_socket_mode_needs_allow_world_socket() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["pmem-agent", "pmem-allocd"] {
        for mode in ["0666", "0777", "0661"] {
            let out = Command::new(bin(name))
                .arg("--endpoint")
                .arg(format!("unix://{}/csi.sock", dir.path().display()))
                .arg("--admin-endpoint")
                .arg(format!("unix://{}/admin.sock", dir.path().display()))
                .arg("--allocator")
                .arg(format!("unix://{}/alloc.sock", dir.path().display()))
                .arg("--state-dir")
                .arg(dir.path().join("state"))
                .args(["--socket-mode", mode])
                .env_remove("PMEM_AGENT_ALLOW_WORLD_SOCKET")
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{name} {mode}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("socket-mode {mode}"))
                    && err.contains("--allow-world-socket"),
                "{name} {mode}: {err}"
            );
            assert!(!dir.path().join("csi.sock").exists());
            assert!(!dir.path().join("state").exists(), "nothing opened");
        }
    }

    let d = Daemon::start(&[
        "--sim-mode",
        "file-only",
        "--socket-mode",
        "0666",
        "--allow-world-socket",
    ])
    .await;
    for s in [d.csi_sock(), d.admin_sock()] {
        assert_eq!(
            std::fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o666
        );
    }
    let log = d.log();
    assert!(
        log.contains("WARN") && log.contains("--allow-world-socket"),
        "{log}"
    );
    drop(d);

    // The environment variable and the config file key work as the flag does.
    let dir = tempfile::Builder::new()
        .prefix("pmem-agent-test")
        .tempdir()
        .unwrap();
    let conf = dir.path().join("c.toml");
    std::fs::write(&conf, "socket-mode = \"0606\"\nallow-world-socket = true\n").unwrap();
    for (i, how) in ["env", "file"].into_iter().enumerate() {
        let sock = dir.path().join(format!("csi{i}.sock"));
        let log = dir.path().join(format!("agent{i}.log"));
        let mut cmd = Command::new(bin("pmem-agent"));
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", sock.display()))
            .arg("--admin-endpoint")
            .arg(format!("unix://{}/admin{i}.sock", dir.path().display()))
            .arg("--state-dir")
            .arg(dir.path().join(format!("state{i}")))
            .args(["--sim-mode", "file-only", "--sim-region-size", "1GiB"])
            .env_remove("PMEM_AGENT_ALLOW_WORLD_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if how == "env" {
            cmd.args(["--socket-mode", "0606"])
                .env("PMEM_AGENT_ALLOW_WORLD_SOCKET", "true");
        } else {
            cmd.arg("--config").arg(&conf);
        }
        let mut child = KillOnDrop(Some(cmd.spawn().unwrap()));
        let mut tries = 0;
        // Ready (Probe), so SIGTERM finds its handler installed.
        let ep = format!("unix://{}", sock.display());
        loop {
            if let Ok(ch) = pmem_agent::client::connect(&ep).await
                && let Ok(r) = csi::identity_client::IdentityClient::new(ch)
                    .probe(csi::ProbeRequest {})
                    .await
                && r.into_inner().ready == Some(true)
            {
                break;
            }
            tries += 1;
            if tries > 600 || child.0.as_mut().unwrap().try_wait().unwrap().is_some() {
                panic!(
                    "{how}: agent not ready:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
            0o606,
            "{how}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.0.as_ref().unwrap().id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut c = child.0.take().unwrap();
        let st = tokio::task::spawn_blocking(move || c.wait().unwrap())
            .await
            .unwrap();
        assert!(st.success(), "{how}: {st}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("WARN") && text.contains("--allow-world-socket"),
            "{how}: {text}"
        );
    }
}

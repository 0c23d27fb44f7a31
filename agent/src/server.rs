//! The daemon: opens the ledger, reconciles, serves CSI and admin gRPC on
//! unix sockets, and shuts down cleanly on SIGTERM/SIGINT.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use pmem_allocator::direct::{DirectBackend, DirectConfig};
use pmem_allocator::lvm::command::{LvmCommand, LvmCommandConfig};
use pmem_allocator::lvm::pvs::{DevicePvs, NamespacePvs, PvRegion, PvSource};
use pmem_allocator::lvm::{LvmBackend, LvmConfig};
use pmem_allocator::sim::{SimBackend, SimConfig, SimMode};
use pmem_allocator::{Allocator, Backend, ErasePolicy};
use pmem_proto::admin::admin_server::AdminServer;
use pmem_proto::csi::controller_server::ControllerServer;
use pmem_proto::csi::identity_server::IdentityServer;
use pmem_proto::csi::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::config::{BackendKind, Config, SimModeArg};
use crate::csi::controller::ControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::driver::Driver;
use crate::store::{RemoteStore, Store};

/// Binds a unix socket with `mode`. A stale socket file is removed; one that
/// a live process still accepts on is refused.
pub fn bind_socket(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "socket {} is in use by a running process (another pmem-agent?); refusing to take it over",
                path.display()
            ),
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path)
                    .with_context(|| format!("remove stale socket {}", path.display()))?;
            }
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat socket {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create socket directory {}", dir.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("bind socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} socket {}", mode, path.display()))?;
    Ok(l)
}

/// Logs the warning that `--allow-world-socket` promises (config validation
/// refuses such a mode without it).
fn warn_world_socket(cfg: &Config) {
    if cfg.socket_mode & 0o007 != 0 {
        tracing::warn!(
            socket_mode = %format!("{:04o}", cfg.socket_mode),
            "--allow-world-socket: every local user can reach the sockets of this root daemon"
        );
    }
}

/// Builds the configured backend.
pub fn open_backend(cfg: &Config) -> anyhow::Result<Arc<dyn Backend>> {
    match cfg.backend {
        BackendKind::Sim => {
            let mode = match cfg.sim_mode {
                SimModeArg::Auto => None,
                SimModeArg::Loop => Some(SimMode::Loop),
                SimModeArg::FileOnly => Some(SimMode::FileOnly),
            };
            let sim = SimBackend::open(&SimConfig {
                dir: cfg.sim_dir(),
                regions: cfg.sim_regions,
                region_size: cfg.sim_region_size,
                align: cfg.sim_align,
                ns_slots: cfg.sim_slots,
                mode,
            })?;
            Ok(Arc::new(sim))
        }
        BackendKind::Direct => {
            let direct = DirectBackend::open(DirectConfig {
                sysfs_root: cfg.sysfs_root.clone(),
                dev_dir: cfg.direct_dev_dir.clone(),
                ..DirectConfig::default()
            })?;
            Ok(Arc::new(direct))
        }
        BackendKind::Lvm => {
            let l = &cfg.lvm;
            let mut config = l.config.clone();
            if config.is_empty() && !Path::new("/run/udev/control").exists() {
                // Without udevd, LVM must make its device nodes itself
                // and not wait for udev.
                config = NO_UDEV_LVM_CONFIG.to_owned();
                tracing::info!("udevd is not running: lvm runs with {config}");
            }
            let runner = Arc::new(LvmCommand::new(LvmCommandConfig {
                prefix: l.command_prefix.clone(),
                config,
                metadata_only: l.metadata_only,
                ..LvmCommandConfig::default()
            }));
            let source: Box<dyn PvSource> = match &l.devices {
                Some(d) => Box::new(DevicePvs(
                    d.iter()
                        .map(|(region, devices)| PvRegion {
                            region: region.clone(),
                            numa_node: 0,
                            devices: devices.clone(),
                        })
                        .collect(),
                )),
                None => Box::new(NamespacePvs {
                    direct: Arc::new(DirectBackend::open(DirectConfig {
                        sysfs_root: cfg.sysfs_root.clone(),
                        dev_dir: cfg.direct_dev_dir.clone(),
                        marker: LVM_NAMESPACE_MARKER.to_owned(),
                        // Physical volumes need no round sizes: the
                        // regions keep the kernel's alignment.
                        namespace_align: None,
                        ..DirectConfig::default()
                    })?),
                    percentage: l.percentage,
                }),
            };
            let lvm = LvmBackend::open(
                runner,
                source.as_ref(),
                LvmConfig {
                    vg_prefix: l.vg_prefix.clone(),
                    metadata_only: l.metadata_only,
                },
            )?;
            Ok(Arc::new(lvm))
        }
    }
}

/// `alt_name` prefix of the namespaces that carry our volume groups.
pub const LVM_NAMESPACE_MARKER: &str = "pmem-agent-lvm:";

/// lvm.conf overrides for hosts and containers without udevd.
const NO_UDEV_LVM_CONFIG: &str = "activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 0 } devices { obtain_device_list_from_udev = 0 }";

struct SocketGuard(Vec<PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// SIGTERM/SIGINT handlers, installed before READY=1 is sent: a signal
/// right after it must stop the daemon cleanly, not kill it.
struct ShutdownSignals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl ShutdownSignals {
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{SignalKind, signal};
        ShutdownSignals(
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(t), Ok(i)) => Some((t, i)),
                _ => None,
            },
        )
    }

    async fn recv(&mut self) -> &'static str {
        let Some((term, int)) = self.0.as_mut() else {
            std::future::pending::<()>().await;
            return "none";
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

/// Opens the state directory, the backend and the ledger (the embedded
/// allocator, or the one pmem-allocd serves).
pub async fn open_allocator(cfg: &Config) -> anyhow::Result<Arc<Allocator>> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create state directory {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod state directory {}", cfg.state_dir.display()))?;
    let backend = open_backend(cfg)?;
    tracing::info!("{}", backend.describe());
    let ledger = cfg.ledger_path();
    let reinitialize = cfg.reinitialize;
    let alloc =
        tokio::task::spawn_blocking(move || Allocator::open_with(&ledger, backend, reinitialize))
            .await??;
    alloc.set_erase_policy(ErasePolicy {
        allow_unerased_reuse: cfg.allow_unerased_reuse,
        rate: cfg.erase_rate,
    });
    if cfg.allow_unerased_reuse {
        tracing::warn!(
            "--allow-unerased-reuse: this node is declared single-tenant; volumes created with eraseAfter=false are not zeroed when deleted, and the next volume on their extent can read their data"
        );
    }
    let alloc = Arc::new(alloc);
    // Erases left by an earlier run resume now, in the background.
    alloc.start_eraser()?;
    Ok(alloc)
}

/// Stops the background eraser (an erase in progress resumes at the next
/// start), so the allocator can close.
async fn stop_eraser(alloc: &Arc<Allocator>) {
    let a = Arc::clone(alloc);
    let _ = tokio::task::spawn_blocking(move || a.stop_eraser()).await;
}

/// Device events matter to the backend that shares its regions with ndctl:
/// direct. The process that owns the allocator watches them.
fn watch_devices(
    alloc: &Arc<Allocator>,
    counter: Option<crate::metrics::DeviceEventCounter>,
) -> Option<crate::device_events::DeviceEvents> {
    (alloc.backend().kind() == "direct")
        .then(|| crate::device_events::start(alloc, counter))
        .flatten()
}

/// Runs the daemon until a signal.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut signals = ShutdownSignals::install();
    let (store, local): (Store, Option<Arc<Allocator>>) = match &cfg.allocator {
        Some(path) => {
            let ep = format!("unix://{}", path.display());
            // The allocator daemon may be (re)starting: wait for it a while.
            let deadline = tokio::time::Instant::now() + cfg.allocator_wait;
            let remote = loop {
                match RemoteStore::connect(&ep).await {
                    Ok(r) => break r,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::info!(error = %e, "waiting for the allocator daemon");
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            tracing::info!(allocator = %ep, "using the allocator daemon");
            (Arc::new(remote), None)
        }
        None => {
            let a = open_allocator(&cfg).await?;
            (Arc::clone(&a) as Store, Some(a))
        }
    };
    let info = {
        let s = Arc::clone(&store);
        tokio::task::spawn_blocking(move || s.backend_info()).await?
    };
    let driver = Arc::new(Driver::new(cfg.clone(), store, &info.kind, info.can_expand));
    if let Some(alloc) = &local {
        // Weak: the ledger must not keep the driver (and itself) alive.
        let weak = Arc::downgrade(&driver);
        alloc.set_commit_observer(pmem_allocator::ledger::CommitObserver(Arc::new(
            move |took| {
                if let Some(d) = weak.upgrade() {
                    d.metrics.observe_commit(took);
                }
            },
        )));
    }
    let metrics_listener = match cfg.metrics_address {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };

    warn_world_socket(&cfg);
    let csi_listener = bind_socket(&cfg.endpoint, cfg.socket_mode)?;
    let admin_listener = bind_socket(&cfg.admin_endpoint, cfg.socket_mode)?;
    let _sockets = SocketGuard(vec![cfg.endpoint.clone(), cfg.admin_endpoint.clone()]);

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let csi = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(Arc::clone(
            &driver,
        ))))
        .add_service(ControllerServer::new(ControllerService::new(Arc::clone(
            &driver,
        ))))
        .add_service(NodeServer::new(NodeService::new(Arc::clone(&driver))))
        .serve_with_incoming_shutdown(
            crate::transport::incoming(csi_listener),
            wait_stop(stop_rx.clone()),
        );
    let admin = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&driver))))
        .serve_with_incoming_shutdown(
            crate::transport::incoming(admin_listener),
            wait_stop(stop_rx.clone()),
        );
    let mut servers = tokio::spawn(async move { tokio::try_join!(csi, admin) });
    if let Some(l) = metrics_listener {
        tracing::info!(address = ?l.local_addr().ok(), "serving /metrics, /healthz, /readyz");
        tokio::spawn(crate::http::serve(l, Arc::clone(&driver), stop_rx.clone()));
    }

    let status = crate::rpc::blocking(&driver.alloc, |a| a.ledger_status())
        .await
        .map_err(|e| anyhow::anyhow!("ledger status: {e}"))?;
    let _device_events = local
        .as_ref()
        .and_then(|a| watch_devices(a, Some(driver.metrics.device_events())));
    // The collector idles until the driver is ready (a refused ledger
    // serves only the admin API until it is rebuilt).
    let collector =
        crate::csi::node::spawn_collector(&driver, Arc::new(crate::mount::host::RealHost::new()));
    match status.refused {
        // Recovery: the process stays up (a restart loop would not help)
        // with Probe and /readyz not ready, CSI calls refused, and the
        // admin API serving the recovery calls.
        Some(why) => {
            tracing::error!(
                ledger = %cfg.ledger_path().display(),
                "LEDGER REFUSED, serving only the admin API (recovery): {why}"
            );
            driver.set_refusal(Some(why));
            crate::notify::notify_logged(
                "READY=1\nSTATUS=ledger refused (recovery): see the log; pmemctl ledger rebuild",
            );
        }
        None => {
            finish_startup(&driver).await?;
            crate::notify::notify_logged("READY=1\nSTATUS=serving CSI");
        }
    }
    if let Some(every) = crate::notify::watchdog_interval() {
        let d = Arc::clone(&driver);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Ping only while healthy, so systemd restarts a wedged daemon.
                // In recovery the daemon is healthy while the ledger answers.
                let recovering = d.refusal().is_some() && {
                    let s = Arc::clone(&d);
                    matches!(
                        tokio::task::spawn_blocking(move || s.alloc.health()).await,
                        Ok(Ok(()))
                    )
                };
                match crate::http::readiness(&d).await {
                    _ if recovering => crate::notify::notify_logged("WATCHDOG=1"),
                    Ok(()) => crate::notify::notify_logged("WATCHDOG=1"),
                    Err(e) if d.is_ready() => {
                        tracing::warn!(error = %e, "withholding watchdog ping")
                    }
                    Err(_) => return,
                }
            }
        });
    }
    tracing::info!(
        endpoint = %cfg.endpoint.display(),
        admin = %cfg.admin_endpoint.display(),
        node = %cfg.node_id,
        driver = %cfg.driver_name,
        "pmem-agent ready"
    );

    tokio::select! {
        sig = signals.recv() => {
            tracing::info!(signal = sig, "shutting down: no new calls, waiting for in-flight calls");
            driver.set_ready(false);
            crate::notify::notify_logged("STOPPING=1");
            let _ = stop_tx.send(true);
            // Clients (kubelet, sidecars) keep idle connections open, so
            // wait for the calls in flight, not for the connections.
            let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
            while driver.metrics.calls_in_flight() > 0 {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(timeout = ?cfg.shutdown_timeout, in_flight = driver.metrics.calls_in_flight(), "in-flight calls did not finish in time; exiting anyway");
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            match tokio::time::timeout(std::time::Duration::from_millis(200), &mut servers).await {
                Ok(r) => { r??; }
                Err(_) => {
                    // Only idle connections are left: drop them.
                    servers.abort();
                    let _ = (&mut servers).await;
                }
            }
        }
        r = &mut servers => {
            r??;
            bail!("gRPC servers stopped unexpectedly");
        }
    }
    collector.abort();
    drop(driver);
    if let Some(alloc) = &local {
        stop_eraser(alloc).await;
    }
    // Close the ledger: the last Arc goes when no blocking task holds it.
    if let Some(alloc) = local {
        match Arc::try_unwrap(alloc) {
            Ok(a) => drop(a),
            // Idle connection tasks still hold it; they and the ledger go
            // when the runtime shuts down right after this returns.
            Err(_) => tracing::debug!("allocator closes with the runtime"),
        }
    }
    tracing::info!("pmem-agent stopped");
    Ok(())
}

/// The start-up steps after the ledger is accepted (at start, or after a
/// `ledger rebuild --apply` in recovery): reconcile, then node start-up
/// (ephemeral volumes), then Probe says ready.
pub async fn finish_startup(driver: &Arc<Driver>) -> anyhow::Result<()> {
    // Probe says ready only once the ledger agrees with the devices.
    let report = crate::rpc::blocking(&driver.alloc, |a| a.reconcile(false, false))
        .await
        .map_err(|e| anyhow::anyhow!("start-up reconciliation: {e}"))?;
    tracing::info!(
        actions = report.actions.len(),
        orphans = report.orphans.len(),
        foreign = report.foreign.len(),
        missing = report.missing.len(),
        errors = report.errors.len(),
        "startup reconciliation done"
    );
    driver.metrics.record_reconcile(&report);
    crate::csi::node::startup(driver).await;
    driver.set_refusal(None);
    driver.set_ready(true);
    Ok(())
}

/// Runs `pmem-allocd`: the allocator alone, serving `pmem.admin.v1.Allocator`
/// on its socket (and the admin API on the admin socket), until a signal.
pub async fn run_allocd(cfg: Config) -> anyhow::Result<()> {
    let mut signals = ShutdownSignals::install();
    let path = cfg.allocator.clone().unwrap_or_else(|| {
        crate::config::socket_path("allocator", crate::config::DEFAULT_ALLOCATOR_ENDPOINT)
            .unwrap_or_else(|_| PathBuf::from("/run/pmem-agent/allocator.sock"))
    });
    let alloc = open_allocator(&cfg).await?;
    warn_world_socket(&cfg);
    let listener = bind_socket(&path, cfg.socket_mode)?;
    let _sockets = SocketGuard(vec![path.clone()]);
    if let Some(why) = alloc.refusal() {
        tracing::error!(
            ledger = %cfg.ledger_path().display(),
            "LEDGER REFUSED, serving only read-only and recovery calls: {why}"
        );
    } else {
        let report = {
            let a = Arc::clone(&alloc);
            tokio::task::spawn_blocking(move || a.reconcile(false, false)).await??
        };
        tracing::info!(
            actions = report.actions.len(),
            orphans = report.orphans.len(),
            errors = report.errors.len(),
            "start-up reconciliation done"
        );
    }
    let _device_events = watch_devices(&alloc, None);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(pmem_proto::admin::allocator_server::AllocatorServer::new(
            crate::allocd::AllocatorService::new(Arc::clone(&alloc)),
        ))
        .serve_with_incoming_shutdown(crate::transport::incoming(listener), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
    let mut server = tokio::spawn(server);
    crate::notify::notify_logged("READY=1\nSTATUS=serving the allocator");
    tracing::info!(socket = %path.display(), "pmem-allocd ready");
    tokio::select! {
        sig = signals.recv() => {
            tracing::info!(signal = sig, "shutting down");
            crate::notify::notify_logged("STOPPING=1");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(cfg.shutdown_timeout, &mut server).await {
                Ok(r) => r??,
                Err(_) => server.abort(),
            }
        }
        r = &mut server => {
            r??;
            bail!("allocator server stopped unexpectedly");
        }
    }
    stop_eraser(&alloc).await;
    if Arc::try_unwrap(alloc).is_err() {
        tracing::warn!("allocator still in use by a blocking task at exit");
    }
    tracing::info!("pmem-allocd stopped");
    Ok(())
}

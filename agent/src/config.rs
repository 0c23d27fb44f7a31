//! Configuration: command-line flags with environment overrides, on top of an
//! optional TOML file, on top of defaults that work out of the box with the
//! `sim` backend. Precedence: flag/env > file > default.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use pmem_allocator::Bytes;
use pmem_allocator::units::parse_size;
use serde::Deserialize;

pub const DEFAULT_DRIVER_NAME: &str = "pmem-agent.csi";
pub const DEFAULT_ENDPOINT: &str = "unix:///run/pmem-agent/csi.sock";
pub const DEFAULT_ADMIN_ENDPOINT: &str = "unix:///run/pmem-agent/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pmem-agent";
/// Where `pmem-allocd` serves by default.
pub const DEFAULT_ALLOCATOR_ENDPOINT: &str = "unix:///run/pmem-agent/allocator.sock";
/// Topology key under which volumes and the node report the node id.
pub const TOPOLOGY_KEY: &str = "pmem-agent.csi/node";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Sim,
    Direct,
    Lvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimModeArg {
    Auto,
    Loop,
    FileOnly,
}

/// pmem-agent: a CSI plugin serving persistent memory on this node.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, env = "PMEM_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// CSI endpoint (unix:///path).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Admin API endpoint (unix:///path).
    #[arg(long, env = "PMEM_AGENT_ADMIN_ENDPOINT")]
    pub admin_endpoint: Option<String>,
    /// Directory for the ledger and sim region files.
    #[arg(long, env = "PMEM_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Node id reported to Kubernetes (default: hostname).
    #[arg(long, env = "PMEM_AGENT_NODE_ID")]
    pub node_id: Option<String>,
    /// CSI driver name.
    #[arg(long, env = "PMEM_AGENT_DRIVER_NAME")]
    pub driver_name: Option<String>,
    /// Device backend.
    #[arg(long, env = "PMEM_AGENT_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Log format.
    #[arg(long, env = "PMEM_AGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Socket file mode, octal (default 0660).
    #[arg(long, env = "PMEM_AGENT_SOCKET_MODE")]
    pub socket_mode: Option<String>,
    /// Accept a socket mode that lets every local user (other bits) drive
    /// the daemon; a warning is logged at start.
    #[arg(long, env = "PMEM_AGENT_ALLOW_WORLD_SOCKET", num_args = 0..=1, default_missing_value = "true")]
    pub allow_world_socket: Option<bool>,
    /// Seconds in-flight calls get to finish at shutdown.
    #[arg(long, env = "PMEM_AGENT_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// The kubelet directory: every staging and target path must lie
    /// beneath it (default /var/lib/kubelet; confinement cannot be turned off).
    #[arg(long, env = "PMEM_AGENT_KUBELET_ROOT")]
    pub kubelet_root: Option<PathBuf>,
    /// Seconds between collections of unused CSI ephemeral inline volumes
    /// (default 60; 0: only at start and after a failed unpublish).
    #[arg(long, env = "PMEM_AGENT_EPHEMERAL_COLLECT_INTERVAL")]
    pub ephemeral_collect_interval: Option<u64>,
    /// Number of sim regions.
    #[arg(long, env = "PMEM_AGENT_SIM_REGIONS")]
    pub sim_regions: Option<u32>,
    /// Size of each sim region (e.g. 4GiB).
    #[arg(long, env = "PMEM_AGENT_SIM_REGION_SIZE")]
    pub sim_region_size: Option<String>,
    /// Alignment of sim regions (e.g. 16MiB).
    #[arg(long, env = "PMEM_AGENT_SIM_ALIGN")]
    pub sim_align: Option<String>,
    /// Namespace slots per sim region.
    #[arg(long, env = "PMEM_AGENT_SIM_SLOTS")]
    pub sim_slots: Option<u32>,
    /// sim device mode: auto (loop devices when permitted), loop, file-only.
    #[arg(long, env = "PMEM_AGENT_SIM_MODE", value_enum)]
    pub sim_mode: Option<SimModeArg>,
    /// Serve /metrics, /healthz and /readyz on HOST:PORT (off by default).
    #[arg(long, env = "PMEM_AGENT_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// pmem-agent: use the allocator daemon at unix:///PATH instead of the
    /// embedded one. pmem-allocd: serve at unix:///PATH.
    #[arg(long, env = "PMEM_AGENT_ALLOCATOR")]
    pub allocator: Option<String>,
    /// Seconds pmem-agent waits at start for the allocator daemon (default 30).
    #[arg(long, env = "PMEM_AGENT_ALLOCATOR_WAIT")]
    pub allocator_wait: Option<u64>,
    /// direct backend: where sysfs is mounted (default /sys).
    #[arg(long, env = "PMEM_AGENT_SYSFS_ROOT")]
    pub sysfs_root: Option<PathBuf>,
    /// direct backend: where block device nodes are, and are created when
    /// neither devtmpfs nor udev made them (default /dev).
    #[arg(long, env = "PMEM_AGENT_DIRECT_DEV_DIR")]
    pub direct_dev_dir: Option<PathBuf>,
    /// lvm backend: percent of each region our namespaces take (default 100).
    #[arg(long, env = "PMEM_AGENT_LVM_PERCENTAGE")]
    pub lvm_percentage: Option<u8>,
    /// lvm backend: use these block devices as physical volumes instead of
    /// namespaces of our own: `region0=/dev/pmem0,/dev/pmem1;region1=/dev/pmem2`.
    #[arg(long, env = "PMEM_AGENT_LVM_DEVICES")]
    pub lvm_devices: Option<String>,
    /// lvm backend: words run before `lvm`, e.g. `nsenter --target 1 --mount --`.
    #[arg(long, env = "PMEM_AGENT_LVM_COMMAND_PREFIX")]
    pub lvm_command_prefix: Option<String>,
    /// lvm backend: lvm.conf overrides passed as --config.
    #[arg(long, env = "PMEM_AGENT_LVM_CONFIG")]
    pub lvm_config: Option<String>,
    /// lvm backend: no device-mapper; write metadata only, never activate.
    #[arg(long, env = "PMEM_AGENT_LVM_METADATA_ONLY")]
    pub lvm_metadata_only: Option<bool>,
    /// lvm backend: volume group name prefix (default `pmem-`).
    #[arg(long, env = "PMEM_AGENT_LVM_VG_PREFIX")]
    pub lvm_vg_prefix: Option<String>,
    /// When the ledger is refused (empty, missing or replaced over regions
    /// that carry an identity or our devices): ERASE every region, remove
    /// our devices and start with an empty ledger. All data is lost. A flag
    /// only (no config key, no environment variable), and ignored when the
    /// ledger and the regions agree.
    #[arg(long)]
    pub reinitialize: bool,
    /// Declares the node single-tenant: volumes created with eraseAfter=false
    /// are not zeroed when deleted, so the next volume on their extent can
    /// read their bytes. Without it every deleted volume is zeroed.
    #[arg(
        long,
        env = "PMEM_AGENT_ALLOW_UNERASED_REUSE",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_unerased_reuse: Option<bool>,
    /// Most bytes per second the background eraser zeroes (e.g. 2GiB);
    /// 0 or unset: as fast as the device goes.
    #[arg(long, env = "PMEM_AGENT_ERASE_RATE")]
    pub erase_rate: Option<String>,
}

/// The TOML file; every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub endpoint: Option<String>,
    pub admin_endpoint: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub node_id: Option<String>,
    pub driver_name: Option<String>,
    pub backend: Option<BackendKind>,
    pub log_format: Option<LogFormat>,
    pub socket_mode: Option<String>,
    pub allow_world_socket: Option<bool>,
    pub shutdown_timeout: Option<u64>,
    pub kubelet_root: Option<PathBuf>,
    pub ephemeral_collect_interval: Option<u64>,
    pub metrics_address: Option<String>,
    pub allocator: Option<String>,
    pub allocator_wait: Option<u64>,
    pub allow_unerased_reuse: Option<bool>,
    pub erase_rate: Option<String>,
    pub sim: Option<SimFileConfig>,
    pub direct: Option<DirectFileConfig>,
    pub lvm: Option<LvmFileConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LvmFileConfig {
    pub percentage: Option<u8>,
    /// region -> block devices
    pub devices: Option<std::collections::BTreeMap<String, Vec<String>>>,
    pub command_prefix: Option<Vec<String>>,
    pub config: Option<String>,
    pub metadata_only: Option<bool>,
    pub vg_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SimFileConfig {
    pub regions: Option<u32>,
    pub region_size: Option<String>,
    pub align: Option<String>,
    pub slots: Option<u32>,
    pub mode: Option<SimModeArg>,
}

/// `[direct]`: the flags `--sysfs-root` and `--direct-dev-dir`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirectFileConfig {
    pub sysfs_root: Option<PathBuf>,
    pub dev_dir: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint: PathBuf,
    pub admin_endpoint: PathBuf,
    pub state_dir: PathBuf,
    pub node_id: String,
    pub driver_name: String,
    pub backend: BackendKind,
    pub log_format: LogFormat,
    pub socket_mode: u32,
    /// `socket_mode` may have other bits (checked in `validate`).
    pub allow_world_socket: bool,
    pub shutdown_timeout: std::time::Duration,
    /// Staging and publish paths are confined beneath it (`mount::confine`).
    pub kubelet_root: PathBuf,
    /// Period of the ephemeral inline volume collection (zero: none).
    pub ephemeral_collect_interval: std::time::Duration,
    pub sim_regions: u32,
    pub sim_region_size: Bytes,
    pub sim_align: Bytes,
    pub sim_slots: u32,
    pub sim_mode: SimModeArg,
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Socket of a separate allocator daemon (`None`: embedded allocator).
    pub allocator: Option<PathBuf>,
    pub allocator_wait: std::time::Duration,
    pub sysfs_root: PathBuf,
    pub direct_dev_dir: PathBuf,
    pub lvm: LvmSettings,
    /// `--reinitialize`: erase the regions when the ledger is refused.
    pub reinitialize: bool,
    /// Single-tenant node: eraseAfter=false volumes are not zeroed at delete.
    pub allow_unerased_reuse: bool,
    /// Upper bound of the background erase rate, bytes per second.
    pub erase_rate: Option<Bytes>,
}

/// The lvm backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmSettings {
    pub percentage: u8,
    /// Configured physical volumes per region; `None`: our own namespaces.
    pub devices: Option<Vec<(String, Vec<String>)>>,
    pub command_prefix: Vec<String>,
    pub config: String,
    pub metadata_only: bool,
    pub vg_prefix: String,
}

/// `region0=/dev/a,/dev/b;region1=/dev/c`
fn lvm_devices(spec: &str) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    spec.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (region, devs) = p.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!("lvm-devices {p:?} is not REGION=/dev/a,/dev/b"))
            })?;
            let devs: Vec<String> = devs
                .split(',')
                .map(|d| d.trim().to_owned())
                .filter(|d| !d.is_empty())
                .collect();
            if region.trim().is_empty() || devs.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "lvm-devices {p:?} needs a region and at least one device"
                )));
            }
            Ok((region.trim().to_owned(), devs))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Strips `unix://` from an endpoint; only unix sockets are served.
pub fn socket_path(field: &str, endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{field} {endpoint:?} must be unix:///absolute/path"
        ))
    })?;
    if !path.starts_with('/') {
        return Err(ConfigError::Invalid(format!(
            "{field} {endpoint:?} must be an absolute path (unix:///...)"
        )));
    }
    Ok(PathBuf::from(path))
}

fn size(field: &str, v: &str) -> Result<Bytes, ConfigError> {
    parse_size(v).map_err(|m| ConfigError::Invalid(format!("{field}: {m}")))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Config {
    pub fn load(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let sim = file.sim.unwrap_or_default();
        let lvm = file.lvm.unwrap_or_default();
        let lvm = LvmSettings {
            percentage: args.lvm_percentage.or(lvm.percentage).unwrap_or(100),
            devices: match args.lvm_devices {
                Some(s) => Some(lvm_devices(&s)?),
                None => lvm.devices.map(|m| m.into_iter().collect()),
            },
            command_prefix: args
                .lvm_command_prefix
                .map(|p| p.split_whitespace().map(str::to_owned).collect())
                .or(lvm.command_prefix)
                .unwrap_or_default(),
            config: args.lvm_config.or(lvm.config).unwrap_or_default(),
            metadata_only: args
                .lvm_metadata_only
                .or(lvm.metadata_only)
                .unwrap_or(false),
            vg_prefix: args
                .lvm_vg_prefix
                .or(lvm.vg_prefix)
                .unwrap_or_else(|| "pmem-".to_owned()),
        };
        let direct = file.direct.unwrap_or_default();
        let endpoint = args
            .endpoint
            .or(file.endpoint)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let admin = args
            .admin_endpoint
            .or(file.admin_endpoint)
            .unwrap_or_else(|| DEFAULT_ADMIN_ENDPOINT.to_owned());
        let mode = args
            .socket_mode
            .or(file.socket_mode)
            .unwrap_or_else(|| "0660".to_owned());
        let socket_mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "socket-mode {mode:?} is not an octal mode like 0660"
                ))
            })?;
        let cfg = Config {
            endpoint: socket_path("endpoint", &endpoint)?,
            admin_endpoint: socket_path("admin-endpoint", &admin)?,
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            node_id: args.node_id.or(file.node_id).unwrap_or_else(hostname),
            driver_name: args
                .driver_name
                .or(file.driver_name)
                .unwrap_or_else(|| DEFAULT_DRIVER_NAME.to_owned()),
            backend: args.backend.or(file.backend).unwrap_or(BackendKind::Sim),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            socket_mode,
            allow_world_socket: args
                .allow_world_socket
                .or(file.allow_world_socket)
                .unwrap_or(false),
            shutdown_timeout: std::time::Duration::from_secs(
                args.shutdown_timeout
                    .or(file.shutdown_timeout)
                    .unwrap_or(30),
            ),
            kubelet_root: args
                .kubelet_root
                .or(file.kubelet_root)
                .unwrap_or_else(|| PathBuf::from(crate::mount::confine::DEFAULT_KUBELET_ROOT)),
            ephemeral_collect_interval: std::time::Duration::from_secs(
                args.ephemeral_collect_interval
                    .or(file.ephemeral_collect_interval)
                    .unwrap_or(60),
            ),
            sim_regions: args.sim_regions.or(sim.regions).unwrap_or(2),
            sim_region_size: size(
                "sim-region-size",
                &args
                    .sim_region_size
                    .or(sim.region_size)
                    .unwrap_or_else(|| "4GiB".into()),
            )?,
            sim_align: size(
                "sim-align",
                &args
                    .sim_align
                    .or(sim.align)
                    .unwrap_or_else(|| "16MiB".into()),
            )?,
            sim_slots: args.sim_slots.or(sim.slots).unwrap_or(509),
            sim_mode: args.sim_mode.or(sim.mode).unwrap_or(SimModeArg::Auto),
            metrics_address: args
                .metrics_address
                .or(file.metrics_address)
                .map(|a| {
                    a.parse().map_err(|e| {
                        ConfigError::Invalid(format!("metrics-address {a:?} is not HOST:PORT: {e}"))
                    })
                })
                .transpose()?,
            allocator: args
                .allocator
                .or(file.allocator)
                .map(|a| socket_path("allocator", &a))
                .transpose()?,
            allocator_wait: std::time::Duration::from_secs(
                args.allocator_wait.or(file.allocator_wait).unwrap_or(30),
            ),
            sysfs_root: args
                .sysfs_root
                .or(direct.sysfs_root)
                .unwrap_or_else(|| PathBuf::from("/sys")),
            direct_dev_dir: args
                .direct_dev_dir
                .or(direct.dev_dir)
                .unwrap_or_else(|| PathBuf::from("/dev")),
            lvm,
            reinitialize: args.reinitialize,
            allow_unerased_reuse: args
                .allow_unerased_reuse
                .or(file.allow_unerased_reuse)
                .unwrap_or(false),
            erase_rate: match args.erase_rate.or(file.erase_rate) {
                Some(r) => Some(size("erase-rate", &r)?).filter(|b| b.0 > 0),
                None => None,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // The sockets drive a root daemon: no access for "other" unless asked.
        if self.socket_mode & 0o007 != 0 && !self.allow_world_socket {
            return Err(ConfigError::Invalid(format!(
                "socket-mode {:04o} lets every local user drive this root daemon (other bits {:o}); \
                 use a group mode such as 0660, or pass --allow-world-socket \
                 (PMEM_AGENT_ALLOW_WORLD_SOCKET=true, allow-world-socket = true) to accept it",
                self.socket_mode,
                self.socket_mode & 0o007
            )));
        }
        if !(1..=100).contains(&self.lvm.percentage) {
            return Err(ConfigError::Invalid(format!(
                "lvm-percentage {} must be 1 to 100",
                self.lvm.percentage
            )));
        }
        if self.node_id.is_empty() || self.node_id.len() > 128 {
            return Err(ConfigError::Invalid(format!(
                "node-id {:?} must be 1 to 128 bytes",
                self.node_id
            )));
        }
        if self.driver_name.is_empty()
            || self.driver_name.len() > 63
            || !self
                .driver_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            || !self
                .driver_name
                .starts_with(|c: char| c.is_ascii_alphanumeric())
            || !self
                .driver_name
                .ends_with(|c: char| c.is_ascii_alphanumeric())
        {
            return Err(ConfigError::Invalid(format!(
                "driver-name {:?} must be at most 63 characters, alphanumeric, '-' or '.', starting and ending alphanumeric",
                self.driver_name
            )));
        }
        if !self.kubelet_root.is_absolute()
            || self
                .kubelet_root
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            || self.kubelet_root == Path::new("/")
        {
            return Err(ConfigError::Invalid(format!(
                "kubelet-root {} must be an absolute path without \"..\", other than /",
                self.kubelet_root.display()
            )));
        }
        if self.endpoint == self.admin_endpoint {
            return Err(ConfigError::Invalid(format!(
                "endpoint and admin-endpoint are both {}",
                self.endpoint.display()
            )));
        }
        if self.sim_align.0 == 0 || !self.sim_region_size.is_aligned(self.sim_align) {
            return Err(ConfigError::Invalid(format!(
                "sim-region-size {} must be a non-zero multiple of sim-align {}",
                self.sim_region_size, self.sim_align
            )));
        }
        Ok(())
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("ledger.db")
    }

    pub fn sim_dir(&self) -> PathBuf {
        self.state_dir.join("sim")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["pmem-agent"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn defaults_work_out_of_the_box() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.driver_name, DEFAULT_DRIVER_NAME);
        assert_eq!(c.backend, BackendKind::Sim);
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.sim_region_size, Bytes::gib(4));
        assert_eq!(c.endpoint, PathBuf::from("/run/pmem-agent/csi.sock"));
    }

    #[test]
    fn file_is_overridden_by_flags_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "node-id = \"n1\"\nbackend = \"sim\"\n[sim]\nregions = 1\nregion-size = \"1GiB\"\n",
        )
        .unwrap();
        let c = Config::load(args(&["--config", p.to_str().unwrap(), "--node-id", "n2"])).unwrap();
        assert_eq!(c.node_id, "n2");
        assert_eq!(c.sim_regions, 1);
        assert_eq!(c.sim_region_size, Bytes::gib(1));
        std::fs::write(&p, "nodeid = \"x\"\n").unwrap();
        let e = Config::load(args(&["--config", p.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("nodeid"), "{e}");
    }

    #[test]
    fn ephemeral_collect_interval_from_flag_env_and_file() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.ephemeral_collect_interval.as_secs(), 60);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "ephemeral-collect-interval = 5\n").unwrap();
        let file = p.to_str().unwrap();
        let c = Config::load(args(&["--config", file])).unwrap();
        assert_eq!(c.ephemeral_collect_interval.as_secs(), 5);
        let c = Config::load(args(&[
            "--config",
            file,
            "--ephemeral-collect-interval",
            "0",
        ]))
        .unwrap();
        assert!(c.ephemeral_collect_interval.is_zero());
    }

    #[test]
    fn direct_paths_default_to_the_host() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(c.direct_dev_dir, PathBuf::from("/dev"));
        let c = Config::load(args(&["--sysfs-root", "/host/sys", "--backend", "direct"])).unwrap();
        assert_eq!(c.sysfs_root, PathBuf::from("/host/sys"));
        assert_eq!(c.backend, BackendKind::Direct);
    }

    #[test]
    fn lvm_settings_from_flags_and_file() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.lvm.percentage, 100);
        assert_eq!(c.lvm.devices, None);
        assert_eq!(c.lvm.vg_prefix, "pmem-");
        let c = Config::load(args(&[
            "--lvm-devices",
            "region0=/dev/a, /dev/b;region1=/dev/c",
            "--lvm-command-prefix",
            "nsenter --target 1 --mount --",
            "--lvm-percentage",
            "50",
        ]))
        .unwrap();
        assert_eq!(
            c.lvm.devices,
            Some(vec![
                ("region0".into(), vec!["/dev/a".into(), "/dev/b".into()]),
                ("region1".into(), vec!["/dev/c".into()]),
            ])
        );
        assert_eq!(
            c.lvm.command_prefix,
            ["nsenter", "--target", "1", "--mount", "--"]
        );
        assert_eq!(c.lvm.percentage, 50);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "backend = \"lvm\"\n[lvm]\npercentage = 80\nmetadata-only = true\nconfig = \"global { use_lvmpolld = 0 }\"\n[lvm.devices]\nregion0 = [\"/dev/x\"]\n",
        )
        .unwrap();
        let c = Config::load(args(&["--config", f.to_str().unwrap()])).unwrap();
        assert_eq!(c.backend, BackendKind::Lvm);
        assert_eq!(c.lvm.percentage, 80);
        assert!(c.lvm.metadata_only);
        assert_eq!(
            c.lvm.devices,
            Some(vec![("region0".into(), vec!["/dev/x".into()])])
        );
        assert!(Config::load(args(&["--lvm-percentage", "0"])).is_err());
        assert!(Config::load(args(&["--lvm-devices", "region0"])).is_err());
        assert!(Config::load(args(&["--lvm-devices", "region0="])).is_err());
    }

    #[test]
    fn direct_paths_come_from_the_file_unless_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "backend = \"direct\"\n[direct]\nsysfs-root = \"/host/sys\"\ndev-dir = \"/host/dev\"\n",
        )
        .unwrap();
        let file = p.to_str().unwrap();
        let c = Config::load(args(&["--config", file])).unwrap();
        assert_eq!(c.backend, BackendKind::Direct);
        assert_eq!(c.sysfs_root, PathBuf::from("/host/sys"));
        assert_eq!(c.direct_dev_dir, PathBuf::from("/host/dev"));
        let c = Config::load(args(&["--config", file, "--direct-dev-dir", "/dev"])).unwrap();
        assert_eq!(c.sysfs_root, PathBuf::from("/host/sys"));
        assert_eq!(c.direct_dev_dir, PathBuf::from("/dev"));
        std::fs::write(&p, "[direct]\nsysfs = \"/sys\"\n").unwrap();
        let e = Config::load(args(&["--config", file])).unwrap_err();
        assert!(e.to_string().contains("sysfs"), "{e}");
    }

    #[test]
    fn world_accessible_socket_mode_needs_allow_world_socket() {
        for mode in ["0666", "0777", "0661", "0604", "0001"] {
            let e = Config::load(args(&["--socket-mode", mode])).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("--allow-world-socket"), "{mode}: {msg}");
            assert!(
                msg.contains(&format!("socket-mode {mode}")),
                "{mode}: {msg}"
            );
            let c = Config::load(args(&["--socket-mode", mode, "--allow-world-socket"])).unwrap();
            assert_eq!(format!("{:04o}", c.socket_mode), mode);
            assert!(c.allow_world_socket);
        }
        // Group and owner bits are fine without it.
        for mode in ["0660", "0600", "0640", "0770"] {
            let c = Config::load(args(&["--socket-mode", mode])).unwrap();
            assert!(!c.allow_world_socket, "{mode}");
        }
        assert!(
            Config::load(args(&[
                "--socket-mode",
                "0666",
                "--allow-world-socket=false"
            ]))
            .is_err()
        );
        // The file key, and a flag that overrides it.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "socket-mode = \"0666\"\nallow-world-socket = true\n").unwrap();
        let file = p.to_str().unwrap();
        let c = Config::load(args(&["--config", file])).unwrap();
        assert_eq!(c.socket_mode, 0o666);
        assert!(c.allow_world_socket);
        assert!(Config::load(args(&["--config", file, "--allow-world-socket=false"])).is_err());
        std::fs::write(&p, "socket-mode = \"0666\"\n").unwrap();
        assert!(Config::load(args(&["--config", file])).is_err());
    }

    #[test]
    fn the_kubelet_root_is_always_set() {
        let c = Config::load(args(&[])).unwrap();
        assert_eq!(c.kubelet_root, PathBuf::from("/var/lib/kubelet"));
        let c = Config::load(args(&["--kubelet-root", "/srv/kubelet"])).unwrap();
        assert_eq!(c.kubelet_root, PathBuf::from("/srv/kubelet"));
        for bad in ["relative", "/a/../b", "/"] {
            let e = Config::load(args(&["--kubelet-root", bad])).unwrap_err();
            assert!(e.to_string().contains("kubelet-root"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn erase_settings_from_flags_env_and_file() {
        let c = Config::load(args(&[])).unwrap();
        assert!(!c.allow_unerased_reuse);
        assert_eq!(c.erase_rate, None);
        let c = Config::load(args(&["--allow-unerased-reuse", "--erase-rate", "1GiB"])).unwrap();
        assert!(c.allow_unerased_reuse);
        assert_eq!(c.erase_rate, Some(Bytes::gib(1)));
        let c = Config::load(args(&["--allow-unerased-reuse=false", "--erase-rate", "0"])).unwrap();
        assert!(!c.allow_unerased_reuse);
        assert_eq!(c.erase_rate, None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "allow-unerased-reuse = true\nerase-rate = \"512MiB\"\n").unwrap();
        let file = p.to_str().unwrap();
        let c = Config::load(args(&["--config", file])).unwrap();
        assert!(c.allow_unerased_reuse);
        assert_eq!(c.erase_rate, Some(Bytes::mib(512)));
        let c = Config::load(args(&["--config", file, "--allow-unerased-reuse", "false"])).unwrap();
        assert!(!c.allow_unerased_reuse);
        assert!(Config::load(args(&["--erase-rate", "fast"])).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::load(args(&["--endpoint", "tcp://1.2.3.4:5"])).is_err());
        assert!(Config::load(args(&["--socket-mode", "999"])).is_err());
        assert!(Config::load(args(&["--metrics-address", "localhost"])).is_err());
        assert!(Config::load(args(&["--driver-name=-bad"])).is_err());
        assert!(
            Config::load(args(&[
                "--sim-region-size",
                "100MiB",
                "--sim-align",
                "64MiB"
            ]))
            .is_err()
        );
    }
}

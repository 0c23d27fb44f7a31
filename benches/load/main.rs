//! Load harness for issue #12 (scale): drives the real `pmem-agent` binary
//! over its unix socket with tonic clients and prints every figure next to
//! floors measured in the same run (the gRPC round trip, Identity.Probe, and
//! one bare durable sqlite commit on the ledger's filesystem), as ratios.
//!
//! Not run by `cargo bench` (the target has `bench = false`); run it with
//! `cargo bench --bench load -- [SCENARIO...] [FLAGS]` after building the
//! daemons (`cargo build --release -p pmem-agent --bins`). `--help` lists
//! the flags; README.md ("Performance") the usual commands.

mod node;
mod report;
mod scenarios;
mod stats;
mod strace;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use node::Spec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Everything below.
    All,
    /// GetCapacity closed loop at 0 and N volumes.
    Capacity,
    /// GetCapacity at a fixed rate (open loop) at N volumes, with RSS.
    Open,
    /// ListVolumes full walk and per-page cost at 500 vs N volumes.
    List,
    /// Create+Delete pairs/s with 1 and K clients on an empty node.
    Pairs,
    /// CreateVolume p50 at 0 vs N volumes.
    Create,
    /// Restart (SIGTERM, start) to Probe-ready at 0 and N volumes.
    Restart,
    /// fsync-family syscalls per create+delete pair (strace -f -c).
    Fsync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllocatorMode {
    /// The agent's embedded allocator.
    Embedded,
    /// Embedded, then through pmem-allocd, with remote/embedded ratios.
    Remote,
    /// Only through pmem-allocd.
    RemoteOnly,
}

/// Load harness for pmem-agent (issue #12).
#[derive(Debug, Parser)]
#[command(about)]
pub struct Cli {
    /// Scenarios to run.
    #[arg(value_enum, default_values_t = [Scenario::All])]
    pub scenarios: Vec<Scenario>,
    /// The pmem-agent binary (default: target/release, else target/debug).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// The pmem-allocd binary (default: next to the agent).
    #[arg(long)]
    pub allocd: Option<PathBuf>,
    /// Where the volumes' store lives.
    #[arg(long, value_enum, default_value_t = AllocatorMode::Embedded)]
    pub allocator: AllocatorMode,
    /// sim backend in loop-device mode (default: file-only).
    #[arg(long = "loop")]
    pub loop_mode: bool,
    /// N: volumes to fill to (default 10,000; 200 with --loop).
    #[arg(long)]
    pub volumes: Option<u64>,
    /// sim regions.
    #[arg(long, default_value_t = 64)]
    pub regions: u32,
    /// Size of each sim region.
    #[arg(long, default_value = "16GiB")]
    pub region_size: String,
    /// Size of each volume (bytes; the sim alignment by default).
    #[arg(long, default_value_t = 16 << 20)]
    pub volume_bytes: u64,
    /// Concurrent clients filling the node.
    #[arg(long, default_value_t = 8)]
    pub fillers: usize,
    /// Open loop: GetCapacity calls per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Open loop: seconds.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Open loop: the client's deadline per call, seconds.
    #[arg(long, default_value_t = 10)]
    pub deadline: u64,
    /// Create+Delete pairs per client count (default 1000; 300 with --loop).
    #[arg(long)]
    pub pairs: Option<u64>,
    /// Clients of the concurrent pairs figure.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Restarts per restart figure (the median is reported).
    #[arg(long)]
    pub restarts: Option<usize>,
    /// Sequential creates per CreateVolume figure.
    #[arg(long)]
    pub creates: Option<u64>,
    /// Also count fsync-family syscalls per pair under strace.
    #[arg(long)]
    pub strace: bool,
    /// A CI-size run: 1,000 volumes, fewer samples, a 3 s open loop.
    #[arg(long)]
    pub quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Parent of the node's temp dir (default: $TMPDIR or /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// The run's sizes after defaults, --quick and --loop are applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenarios: Vec<Scenario>,
    pub volumes: u64,
    pub volume_bytes: u64,
    pub fillers: usize,
    pub rate: u64,
    pub duration: u64,
    pub deadline: u64,
    pub pairs: u64,
    pub clients: usize,
    pub restarts: usize,
    pub creates: u64,
    pub probe_calls: u64,
    pub commits: u64,
}

impl Plan {
    fn new(cli: &Cli) -> Plan {
        let q = cli.quick;
        let lp = cli.loop_mode;
        let mut scenarios = cli.scenarios.clone();
        if cli.strace && !scenarios.contains(&Scenario::Fsync) {
            scenarios.push(Scenario::Fsync);
        }
        Plan {
            scenarios,
            volumes: cli.volumes.unwrap_or(match (q, lp) {
                (_, true) => 200,
                (true, false) => 1000,
                (false, false) => 10_000,
            }),
            volume_bytes: cli.volume_bytes,
            fillers: cli.fillers.max(1),
            rate: cli.rate.max(1),
            duration: cli.duration.unwrap_or(if q { 3 } else { 10 }),
            deadline: cli.deadline.max(1),
            pairs: cli.pairs.unwrap_or(match (q, lp) {
                (true, _) => 200,
                (false, true) => 300,
                (false, false) => 1000,
            }),
            clients: cli.clients.max(1),
            restarts: cli.restarts.unwrap_or(if q { 3 } else { 5 }).max(1),
            creates: cli.creates.unwrap_or(if q { 50 } else { 200 }).max(1),
            probe_calls: if q { 1000 } else { 3000 },
            commits: if q { 100 } else { 300 },
        }
    }

    pub fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&Scenario::All) || self.scenarios.contains(&s)
    }
}

fn default_bin(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let release = root.join("release").join(name);
    if release.exists() {
        release
    } else {
        root.join("debug").join(name)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let plan = Plan::new(&cli);
    let agent = cli
        .agent
        .clone()
        .unwrap_or_else(|| default_bin("pmem-agent"));
    let allocd = cli.allocd.clone().unwrap_or_else(|| {
        agent
            .parent()
            .map(|d| d.join("pmem-allocd"))
            .unwrap_or_else(|| default_bin("pmem-allocd"))
    });
    if !agent.exists() {
        bail!(
            "no agent binary at {}: build it first (cargo build --release -p pmem-agent --bins) or pass --agent",
            agent.display()
        );
    }
    if cli.allocator != AllocatorMode::Embedded && !allocd.exists() {
        bail!(
            "no pmem-allocd binary at {}: pass --allocd",
            allocd.display()
        );
    }
    if plan.has(Scenario::Fsync)
        && std::process::Command::new("strace")
            .arg("-V")
            .stdout(std::process::Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
    {
        bail!("the fsync scenario needs strace on PATH (scripts/setup-debian installs it)");
    }
    let parent = cli.dir.clone().unwrap_or_else(std::env::temp_dir);
    let spec = |remote| Spec {
        agent: agent.clone(),
        allocd: allocd.clone(),
        remote,
        loop_mode: cli.loop_mode,
        regions: cli.regions,
        region_size: cli.region_size.clone(),
        parent: parent.clone(),
    };
    let header = format!(
        "pmem-agent load harness: agent {}, sim {} × {} {}, N = {} volumes of {} MiB, {} cores",
        agent.display(),
        cli.regions,
        cli.region_size,
        if cli.loop_mode { "loop" } else { "file-only" },
        plan.volumes,
        plan.volume_bytes >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    eprintln!("{header}");
    // Ctrl-C drops the run, and with it the nodes (daemons, loop devices).
    tokio::select! {
        r = measure(&cli, &plan, spec, header) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

async fn measure(
    cli: &Cli,
    plan: &Plan,
    spec: impl Fn(bool) -> Spec,
    header: String,
) -> Result<()> {
    let mut runs = Vec::new();
    let mut failed = None;
    for (name, remote, on) in [
        (
            "embedded",
            false,
            cli.allocator != AllocatorMode::RemoteOnly,
        ),
        ("remote", true, cli.allocator != AllocatorMode::Embedded),
    ] {
        if !on {
            continue;
        }
        match scenarios::run(plan, &spec(remote)).await {
            Ok(rows) => {
                // Printed as soon as it is done: a later run may fail.
                eprintln!("\n## {name} store\n\n{}", report::markdown(&rows));
                runs.push((name, rows));
            }
            Err(e) => {
                eprintln!("{name} run failed: {e:#}");
                failed = Some(e.context(format!("{name} run")));
                break;
            }
        }
    }
    let mut out = format!("{header}\n\n");
    for (name, rows) in &runs {
        out.push_str(&format!("## {name} store\n\n{}\n", report::markdown(rows)));
    }
    if let [(_, emb), (_, rem)] = runs.as_slice() {
        out.push_str(&format!(
            "## remote / embedded\n\n{}\n",
            report::compare(emb, rem)
        ));
    }
    println!("{out}");
    if let Some(p) = &cli.json {
        let doc = serde_json::json!({
            "header": header,
            "runs": runs.iter().map(|(n, r)| serde_json::json!({"store": n, "rows": r})).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    failed.map_or(Ok(()), Err)
}

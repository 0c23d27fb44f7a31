//! pmem-conformance: the CSI conformance cases of the upstream suite
//! (kubernetes-csi/csi-test `pkg/sanity`), rewritten in Rust, run against a
//! CSI endpoint. A table (cases.tsv) maps every upstream spec to one of our
//! cases, or to the capability whose absence skips it; the report counts
//! passed/failed/skipped/missing against that table.

mod cases;
mod ctx;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use regex::Regex;

use crate::cases::{Case, Gate};
use crate::ctx::{Config, Ctx, Need, Stop};

/// The table compiled in, so the binary alone is enough in a guest.
const TABLE: &str = include_str!("../cases.tsv");

/// Beneath the agent's default `--kubelet-root`: it refuses paths elsewhere.
const DEFAULT_STAGING: &str = "/var/lib/kubelet/plugins/pmem-conformance/staging";
const DEFAULT_TARGET: &str = "/var/lib/kubelet/pods/pmem-conformance/volumes/mount";

#[derive(Debug, Parser)]
#[command(
    name = "pmem-conformance",
    about = "Runs the CSI conformance cases against a CSI endpoint"
)]
struct Args {
    /// CSI endpoint: unix:///path or a plain socket path.
    #[arg(long)]
    endpoint: String,
    /// NodeStageVolume staging_target_path; made before and removed after
    /// each case. Must lie beneath the driver's kubelet root.
    #[arg(long, default_value = DEFAULT_STAGING)]
    staging_dir: PathBuf,
    /// Parent of the publish target paths (`<dir>/target`); made before and
    /// removed after each case. Must lie beneath the driver's kubelet root.
    #[arg(long, default_value = DEFAULT_TARGET)]
    target_dir: PathBuf,
    /// A CreateVolume parameter, KEY=VALUE (repeatable).
    #[arg(long = "param", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// required_bytes of the test volumes (bytes, or with Ki/Mi/Gi/Ti).
    #[arg(long, default_value = "512Mi", value_parser = parse_size)]
    test_volume_size: i64,
    /// Size the expansion cases grow a volume to (default: the test size + 1Gi).
    #[arg(long, value_parser = parse_size)]
    test_volume_expand_size: Option<i64>,
    /// mount or block.
    #[arg(long, default_value = "mount", value_parser = ["mount", "block"])]
    test_volume_access_type: String,
    /// How often the idempotency cases repeat each mutating call.
    #[arg(long, default_value_t = 10)]
    idempotency_count: usize,
    /// Run only the specs whose name matches.
    #[arg(long)]
    focus: Option<Regex>,
    /// Leave out the specs whose name matches.
    #[arg(long)]
    skip: Option<Regex>,
    /// The spec table (default: the one compiled in).
    #[arg(long)]
    table: Option<PathBuf>,
    /// Deadline of each RPC, in seconds.
    #[arg(long, default_value_t = 300)]
    rpc_timeout: u64,
    /// pmem-agent's admin endpoint (optional, not CSI): after each case, wait
    /// until no deleted volume is still being erased, so that every case
    /// starts from the same layout (in-place growth on sim depends on it).
    #[arg(long)]
    admin_endpoint: Option<String>,
    /// Print the table with the case of each spec and exit.
    #[arg(long)]
    list: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mul: i64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        "T" | "Ti" | "TiB" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mul)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// One table row: an upstream spec and what stands for it here.
#[derive(Debug)]
struct Row {
    spec: String,
    target: Target,
    line: usize,
}

#[derive(Debug)]
enum Target {
    Case(String),
    /// No case of ours: the spec only runs when this is advertised.
    SkipUnless(Need),
}

fn parse_table(text: &str) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (spec, target) = line
            .split_once('\t')
            .ok_or_else(|| format!("table line {line_no}: no tab between spec and target"))?;
        let spec = spec.trim().to_owned();
        let target = target.trim();
        if !seen.insert(spec.clone()) {
            return Err(format!("table line {line_no}: spec {spec:?} listed twice"));
        }
        let target = match target.strip_prefix("skip-unless ") {
            Some(cap) => Target::SkipUnless(
                Need::parse(cap).map_err(|e| format!("table line {line_no}: {e}"))?,
            ),
            None => Target::Case(target.to_owned()),
        };
        rows.push(Row {
            spec,
            target,
            line: line_no,
        });
    }
    Ok(rows)
}

#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
    missing: usize,
    filtered: usize,
}

impl Tally {
    fn line(&self, what: &str, total: usize) -> String {
        format!(
            "{what}: {} passed, {} failed, {} skipped, {} missing, {} filtered out ({total} specs)",
            self.passed, self.failed, self.skipped, self.missing, self.filtered
        )
    }
}

/// The first gate a case does not meet, as a reason.
fn unmet(ctx: &Ctx, case: &Case) -> Option<String> {
    case.gates.iter().find_map(|g| match *g {
        Gate::Has(n) if !ctx.has(n) => Some(format!("{} not advertised", n.name())),
        Gate::Lacks(n) if ctx.has(n) => Some(format!("{} advertised", n.name())),
        _ => None,
    })
}

async fn run_case(ctx: &Ctx, case: &Case) -> Result<Option<String>, String> {
    ctx.make_dirs()?;
    let res = (case.run)(ctx).await;
    let layout = match &res {
        Err(Stop::Fail(_)) => ctx.layout().await,
        _ => None,
    };
    // Cleanup and directory removal run whatever the case did.
    let clean = ctx.cleanup().await;
    let dirs = ctx.remove_dirs();
    let settled = ctx.settle().await;
    let mut errs = Vec::new();
    let skipped = match res {
        Ok(()) => None,
        Err(Stop::Skip(why)) => Some(why),
        Err(Stop::Fail(m)) => {
            errs.push(match layout {
                Some(l) => format!("{m}\n    layout at the failure: {l}"),
                None => m,
            });
            None
        }
    };
    errs.extend(clean.err());
    errs.extend(dirs.err());
    errs.extend(settled.err());
    if errs.is_empty() {
        Ok(skipped)
    } else {
        Err(errs.join("; "))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let text = match &args.table {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("pmem-conformance: read {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => TABLE.to_owned(),
    };
    let rows = match parse_table(&text) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pmem-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    let cases = cases::all();
    let by_id: HashMap<&str, &Case> = cases.iter().map(|c| (c.id, c)).collect();
    if args.list {
        for r in &rows {
            match &r.target {
                Target::Case(id) => println!("{}\t{id}", r.spec),
                Target::SkipUnless(n) => println!("{}\tskip-unless {}", r.spec, n.name()),
            }
        }
        return ExitCode::SUCCESS;
    }

    let cfg = Config {
        staging_dir: args.staging_dir.clone(),
        target_dir: args.target_dir.clone(),
        params: args.params.iter().cloned().collect(),
        volume_size: args.test_volume_size,
        expand_size: args
            .test_volume_expand_size
            .unwrap_or(args.test_volume_size + (1 << 30)),
        idempotency: args.idempotency_count,
        block: args.test_volume_access_type == "block",
    };
    let ch = match ctx::connect(&args.endpoint, Duration::from_secs(args.rpc_timeout)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pmem-conformance: {e}");
            return ExitCode::from(2);
        }
    };
    let admin = match &args.admin_endpoint {
        Some(ep) => match ctx::connect(ep, Duration::from_secs(args.rpc_timeout)).await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("pmem-conformance: admin endpoint: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let mut ctx = Ctx::new(ch, admin, cfg);
    if let Err(e) = ctx.load_caps().await {
        eprintln!("pmem-conformance: cannot read the driver's capabilities: {e}");
        return ExitCode::from(2);
    }
    println!(
        "pmem-conformance: {} specs in the table, {} cases; endpoint {}",
        rows.len(),
        cases.len(),
        args.endpoint
    );

    let t0 = Instant::now();
    let mut upstream = Tally::default();
    let mut ours = Tally::default();
    let (mut n_up, mut n_ours) = (0, 0);
    let mut used = HashSet::new();
    let mut failures = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        let n = n + 1;
        // Rows for our own cases are marked in the table with a "[pmem]" prefix.
        let is_ours = row.spec.starts_with("[pmem]");
        let tally = if is_ours {
            n_ours += 1;
            &mut ours
        } else {
            n_up += 1;
            &mut upstream
        };
        if let Target::Case(id) = &row.target {
            used.insert(id.as_str());
        }
        let wanted = args.focus.as_ref().is_none_or(|r| r.is_match(&row.spec))
            && args.skip.as_ref().is_none_or(|r| !r.is_match(&row.spec));
        if !wanted {
            tally.filtered += 1;
            continue;
        }
        match &row.target {
            Target::SkipUnless(need) if !ctx.has(*need) => {
                tally.skipped += 1;
                println!("skip {n} - {} # {} not advertised", row.spec, need.name());
            }
            Target::SkipUnless(need) => {
                tally.missing += 1;
                println!(
                    "MISSING {n} - {} # {} is advertised, but no case stands for this spec",
                    row.spec,
                    need.name()
                );
                failures.push(format!("{} (missing)", row.spec));
            }
            Target::Case(id) => {
                let Some(case) = by_id.get(id.as_str()) else {
                    tally.missing += 1;
                    println!(
                        "MISSING {n} - {} # table line {}: no case {id:?}",
                        row.spec, row.line
                    );
                    failures.push(format!("{} (missing case {id})", row.spec));
                    continue;
                };
                if let Some(why) = unmet(&ctx, case) {
                    tally.skipped += 1;
                    println!("skip {n} - {} # {why}", row.spec);
                    continue;
                }
                let t = Instant::now();
                match run_case(&ctx, case).await {
                    Ok(None) => {
                        tally.passed += 1;
                        println!(
                            "ok {n} - {} [{id}] ({} ms)",
                            row.spec,
                            t.elapsed().as_millis()
                        );
                    }
                    Ok(Some(why)) => {
                        tally.skipped += 1;
                        println!("skip {n} - {} [{id}] # {why}", row.spec);
                    }
                    Err(e) => {
                        tally.failed += 1;
                        println!("not ok {n} - {} [{id}]\n    {e}", row.spec);
                        failures.push(format!("{} [{id}]: {e}", row.spec));
                    }
                }
            }
        }
    }
    // A case the table never names would be run by nobody: count it.
    for c in &cases {
        if !used.contains(c.id) {
            ours.missing += 1;
            println!("MISSING - case {:?} is not in the table", c.id);
            failures.push(format!("case {} not in the table", c.id));
        }
    }
    println!();
    println!("{}", upstream.line("upstream", n_up));
    println!("{}", ours.line("pmem", n_ours));
    println!("time: {:.1} s", t0.elapsed().as_secs_f64());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failures:");
        for f in &failures {
            println!("  {f}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spec of the table names a case that exists or a capability,
    /// and every case is named by exactly one spec.
    #[test]
    fn table_and_cases_match() {
        let rows = parse_table(TABLE).expect("table parses");
        let cases = cases::all();
        let ids: HashSet<&str> = cases.iter().map(|c| c.id).collect();
        let mut named = HashMap::new();
        for r in &rows {
            if let Target::Case(id) = &r.target {
                assert!(ids.contains(id.as_str()), "line {}: no case {id}", r.line);
                assert!(
                    named.insert(id.clone(), r.line).is_none(),
                    "case {id} named twice"
                );
            }
        }
        for id in ids {
            assert!(named.contains_key(id), "case {id} is not in the table");
        }
        let upstream = rows
            .iter()
            .filter(|r| !r.spec.starts_with("[pmem]"))
            .count();
        assert_eq!(upstream, 95, "the upstream suite has 95 runnable specs");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1Xi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn table_errors_name_the_line() {
        let e = parse_table("a\tx\na\ty\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_table("b\tskip-unless controller:NOPE\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("NOPE"), "{e}");
        let e = parse_table("c no tab\n").unwrap_err();
        assert!(e.contains("no tab"), "{e}");
    }
}
